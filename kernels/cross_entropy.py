"""Summed cross entropy of LM-head logits whose gradient is made in the forward:
`cross_entropy_sum(logits, targets) -> float32 scalar`, differentiable w.r.t. logits [rows, vocab].

PyTorch's formula keeps float32 [rows, vocab] tensors alive around the loss (the logits' float32
copy, the log-softmax saved for the backward, its gradient: 3.2 GB each at 8 x 2048 tokens and a
49152 vocabulary) and passes over them about ten times. Here one pass over each row forms its
logsumexp, its loss and d loss / d logits = softmax - onehot(target), written in the logits' dtype;
the backward only scales that tensor (in place) by the incoming gradient. On CUDA that is one kernel
of kernels/cuda/cross_entropy.cu per call; elsewhere (and for shapes the kernel does not take) the
same quantities in PyTorch, REFERENCE_CHUNK_ROWS rows at a time. `torch.library.custom_op`
`sparse_llm::cross_entropy_loss_grad`.

Targets equal to IGNORE_INDEX (-100, as in F.cross_entropy) add no loss and no gradient; a target
outside [0, vocab) gives a NaN loss instead of an error, which would need a host sync.
"""
from __future__ import annotations

import torch
from torch import Tensor

from sparse_llm.kernels.loader import launch

SOURCE = "cross_entropy.cu"
IGNORE_INDEX = -100
REFERENCE_CHUNK_ROWS = 1024
_DTYPES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}


def kernel_defines(dtype: torch.dtype) -> dict[str, int]:
    return {"CE_DTYPE": _DTYPES[dtype]}


def kernel_variants(dtype: torch.dtype) -> list[tuple[str, dict[str, int]]]:
    """(source, defines) of the module the op compiles for this dtype (for the warm-up)."""
    return [(SOURCE, kernel_defines(dtype))]


def kernel_supported(logits: Tensor, targets: Tensor) -> bool:
    """Whether the CUDA kernel takes these: contiguous 16-byte-aligned rows of bf16, fp16 or float32."""
    if not (logits.is_cuda and logits.dtype in _DTYPES and logits.dim() == 2 and logits.is_contiguous()):
        return False
    per_vector = 16 // logits.element_size()
    if logits.shape[1] % per_vector or logits.data_ptr() % 16 or logits.shape[0] >= 2**31:
        return False
    if targets.device != logits.device or targets.dtype != torch.int64:
        return False
    from sparse_llm.kernels.loader import cupy_available

    return cupy_available()


def loss_grad_reference(logits: Tensor, targets: Tensor, with_grad: bool) -> tuple[Tensor, Tensor]:
    """(summed loss, d loss / d logits or an empty tensor) in PyTorch, a chunk of rows at a time,
    computed in float32 (float64 for float64 logits)."""
    rows, vocab = logits.shape
    compute = torch.promote_types(logits.dtype, torch.float32)
    loss = torch.zeros((), dtype=compute, device=logits.device)
    grad = torch.empty_like(logits) if with_grad else logits.new_empty(0)
    for start in range(0, rows, REFERENCE_CHUNK_ROWS):
        part = logits[start:start + REFERENCE_CHUNK_ROWS].to(compute, copy=True)  # worked on in place
        target = targets[start:start + REFERENCE_CHUNK_ROWS]
        counted = target != IGNORE_INDEX
        in_range = (target >= 0) & (target < vocab)
        index = target.clamp(0, vocab - 1)[:, None]
        lse = torch.logsumexp(part, dim=1)
        row_loss = torch.where(in_range, lse - part.gather(1, index)[:, 0], torch.nan)
        loss += torch.where(counted, row_loss, 0.0).sum()
        if with_grad:  # an ignored row's softmax is exp(x - inf) = 0, and it gets no one-hot
            part.sub_(torch.where(counted, lse, torch.inf)[:, None]).exp_()
            part.scatter_add_(1, index, -(counted & in_range).to(compute)[:, None])
            grad[start:start + REFERENCE_CHUNK_ROWS] = part
    return loss.float(), grad


def _loss_grad_cuda(logits: Tensor, targets: Tensor, with_grad: bool) -> tuple[Tensor, Tensor]:
    import numpy as np

    from sparse_llm.kernels.loader import get_kernel, ptr

    rows, vocab = logits.shape
    row_loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    grad = torch.empty_like(logits) if with_grad else logits.new_empty(0)
    if rows:
        kernel = get_kernel(SOURCE, "ce_loss_grad", logits.device, **kernel_defines(logits.dtype))
        launch(kernel, (rows,), (512,), (ptr(logits), ptr(targets.contiguous()), ptr(row_loss),
                                         ptr(grad if with_grad else None), np.int32(vocab), np.int64(IGNORE_INDEX)))
    return row_loss.sum(), grad


@torch.library.custom_op("sparse_llm::cross_entropy_loss_grad", mutates_args=())
def cross_entropy_loss_grad(logits: Tensor, targets: Tensor, with_grad: bool) -> tuple[Tensor, Tensor]:
    """(summed float32 loss, d loss / d logits in the logits' dtype or, without `with_grad`, empty)."""
    if kernel_supported(logits, targets):
        return _loss_grad_cuda(logits, targets, with_grad)
    return loss_grad_reference(logits, targets, with_grad)


@cross_entropy_loss_grad.register_fake
def _(logits, targets, with_grad):
    return logits.new_empty((), dtype=torch.float32), torch.empty_like(logits) if with_grad else logits.new_empty(0)


class _CrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> Tensor:
        loss, grad = torch.ops.sparse_llm.cross_entropy_loss_grad(logits, targets, True)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, d_loss: Tensor):
        (grad,) = ctx.saved_tensors
        # in place: no second [rows, vocab] tensor; a second backward through this graph
        # (retain_graph) fails autograd's version check instead of reading the scaled values
        return grad.mul_(d_loss), None


def cross_entropy_sum(logits: Tensor, targets: Tensor) -> Tensor:
    """Summed cross entropy of logits [rows, vocab] against targets [rows] (int64), float32;
    differentiable w.r.t. logits. Without autograd (evaluation) no gradient is formed."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy_sum takes logits [rows, vocab] and targets [rows], got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    targets = targets.long()
    if torch.is_grad_enabled() and logits.requires_grad:
        return _CrossEntropySum.apply(logits, targets)
    return torch.ops.sparse_llm.cross_entropy_loss_grad(logits, targets, False)[0]
