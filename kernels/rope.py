"""Rotary position embedding fused with the split of the attention's qkv projection:
`rope_qkv(qkv, cos, sin, n_heads) -> (q, k, v)`, each [batch, heads, seq, head_dim], held in
[batch, seq, heads, head_dim] memory: SDPA keeps that layout for its output, which then reshapes to
[batch, seq, d_model] for the output projection as a view (one copy and one saved tensor fewer).

The PyTorch formula (`rope_reference`) costs about ten elementwise passes over q and k each way
(float32 copies, a cat, a neg, two products and a sum), and SDPA's saved v (a view of the
projection's output) keeps the whole [batch, seq, 3 d_model] output alive until the backward.
On CUDA 16-bit tensors one kernel of kernels/cuda/rope.cu does the rotation in float32 and writes
q, k and v; one kernel does the transposed rotation in the backward. Elsewhere the op runs the
reference. `torch.library.custom_op`s `sparse_llm::rope_qkv` and `sparse_llm::rope_qkv_bwd`. Under
torch.compile `rope_qkv` traces the formula instead, which Inductor fuses with its neighbours.
"""
from __future__ import annotations

import torch
from torch import Tensor

from sparse_llm.kernels.loader import launch

SOURCE = "rope.cu"
_DTYPES = {torch.bfloat16: 0, torch.float16: 1}


def rope_reference(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE of x [..., seq, head_dim] by float32 tables [seq, head_dim], computed in
    float32 (float64 for float64 x) and rounded once to x's dtype."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    compute = torch.promote_types(x.dtype, torch.float32)
    return (x.to(compute) * cos + rotated.to(compute) * sin).to(x.dtype)


def split_heads(qkv: Tensor, n_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """[batch, seq, 3 d_model] -> q, k, v views [batch, heads, seq, head_dim]."""
    batch, seq, width = qkv.shape
    return qkv.view(batch, seq, 3, n_heads, width // (3 * n_heads)).permute(2, 0, 3, 1, 4).unbind(0)


def new_heads(like: Tensor, batch: int, seq: int, n_heads: int, head_dim: int) -> Tensor:
    """An empty [batch, heads, seq, head_dim] view of [batch, seq, heads, head_dim] memory."""
    return like.new_empty(batch, seq, n_heads, head_dim).transpose(1, 2)


def kernel_defines(dtype: torch.dtype) -> dict[str, int]:
    return {"TW_DTYPE": _DTYPES[dtype]}


def kernel_variants(dtype: torch.dtype) -> list[tuple[str, dict[str, int]]]:
    """(source, defines) of the module the op compiles for this dtype (for the warm-up)."""
    return [(SOURCE, kernel_defines(dtype))]


def kernel_supported(t: Tensor, cos: Tensor, batch: int, seq: int, n_heads: int, head_dim: int) -> bool:
    """Whether the CUDA kernels take a qkv (or gradient) tensor like `t` of these sizes."""
    if not (t.is_cuda and t.dtype in _DTYPES and cos.is_cuda and cos.dtype == torch.float32):
        return False
    if head_dim % 4 or head_dim > 1024 or batch * seq * 3 * n_heads >= 2**31:
        return False
    from sparse_llm.kernels.loader import cupy_available

    return cupy_available()


def _grid(rows: int, head_dim: int) -> tuple[tuple[int], tuple[int, int]]:
    pairs = head_dim // 4
    per_block = max(1, 256 // pairs)
    return ((rows + per_block - 1) // per_block,), (pairs, per_block)


def _kernel(name: str, device, dtype):
    from sparse_llm.kernels.loader import get_kernel

    return get_kernel(SOURCE, name, device, **kernel_defines(dtype))


def _fwd_cuda(qkv: Tensor, cos: Tensor, sin: Tensor, n_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    import numpy as np

    from sparse_llm.kernels.loader import ptr

    batch, seq, width = qkv.shape
    head_dim = width // (3 * n_heads)
    qkv, cos, sin = qkv.contiguous(), cos.contiguous(), sin.contiguous()
    q, k, v = (new_heads(qkv, batch, seq, n_heads, head_dim) for _ in range(3))
    rows = batch * seq * 3 * n_heads
    if rows:
        i32 = np.int32
        launch(_kernel("rope_fwd", qkv.device, qkv.dtype), *_grid(rows, head_dim),
               (ptr(qkv), ptr(cos), ptr(sin), ptr(q), ptr(k), ptr(v), i32(batch), i32(seq), i32(n_heads),
                i32(head_dim)))
    return q, k, v


def _pairs_aligned(t: Tensor) -> Tensor:
    """t itself when its head_dim is contiguous and every row starts 4-byte aligned, else a copy."""
    aligned = t.stride(-1) == 1 and all(s % 2 == 0 for s in t.stride()[:-1]) and t.data_ptr() % 4 == 0
    return t if aligned else t.contiguous()


def _bwd_cuda(dq: Tensor, dk: Tensor, dv: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    import numpy as np

    from sparse_llm.kernels.loader import ptr

    batch, n_heads, seq, head_dim = dq.shape
    grads = [_pairs_aligned(g) for g in (dq, dk, dv)]
    dqkv = dq.new_empty(batch, seq, 3 * n_heads * head_dim)
    rows = batch * seq * 3 * n_heads
    if rows:
        i32, i64 = np.int32, np.int64
        args = []
        for g in grads:
            args += [ptr(g), *(i64(s) for s in g.stride()[:3])]
        launch(_kernel("rope_bwd", dq.device, dq.dtype), *_grid(rows, head_dim),
               (*args, ptr(cos.contiguous()), ptr(sin.contiguous()), ptr(dqkv), i32(batch), i32(seq),
                i32(n_heads), i32(head_dim)))
    return dqkv


@torch.library.custom_op("sparse_llm::rope_qkv", mutates_args=())
def rope_qkv_op(qkv: Tensor, cos: Tensor, sin: Tensor, n_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v [batch, heads, seq, head_dim] (see `new_heads`) of qkv [batch, seq, 3 d_model], q and k rotated."""
    batch, seq, width = qkv.shape
    head_dim = width // (3 * n_heads)
    if kernel_supported(qkv, cos, batch, seq, n_heads, head_dim):
        return _fwd_cuda(qkv, cos, sin, n_heads)
    q, k, v = split_heads(qkv, n_heads)
    outs = [new_heads(qkv, batch, seq, n_heads, head_dim) for _ in range(3)]
    for out, value in zip(outs, (rope_reference(q, cos, sin), rope_reference(k, cos, sin), v)):
        out.copy_(value)
    return tuple(outs)


@rope_qkv_op.register_fake
def _(qkv, cos, sin, n_heads):
    batch, seq, width = qkv.shape
    return tuple(new_heads(qkv, batch, seq, n_heads, width // (3 * n_heads)) for _ in range(3))


@torch.library.custom_op("sparse_llm::rope_qkv_bwd", mutates_args=())
def rope_qkv_bwd_op(dq: Tensor, dk: Tensor, dv: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """d qkv [batch, seq, 3 d_model] from the gradients of q, k, v: the rotation by minus the angle."""
    batch, n_heads, seq, head_dim = dq.shape
    same = dk.dtype == dv.dtype == dq.dtype and dk.device == dv.device == dq.device
    if same and kernel_supported(dq, cos, batch, seq, n_heads, head_dim):
        return _bwd_cuda(dq, dk, dv, cos, sin)
    parts = [rope_reference(dq, cos, -sin), rope_reference(dk, cos, -sin), dv]
    return torch.stack(parts, dim=2).transpose(1, 3).flatten(2).contiguous()


@rope_qkv_bwd_op.register_fake
def _(dq, dk, dv, cos, sin):
    batch, n_heads, seq, head_dim = dq.shape
    return dq.new_empty(batch, seq, 3 * n_heads * head_dim)


def _setup_context(ctx, inputs, output):
    _, cos, sin, _ = inputs
    ctx.save_for_backward(cos, sin)


def _backward(ctx, dq, dk, dv):
    cos, sin = ctx.saved_tensors
    return torch.ops.sparse_llm.rope_qkv_bwd(dq, dk, dv, cos, sin), None, None, None


rope_qkv_op.register_autograd(_backward, setup_context=_setup_context)


def rope_qkv(qkv: Tensor, cos: Tensor, sin: Tensor, n_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """Split the qkv projection's output [batch, seq, 3 d_model] into heads and rotate q and k by the
    float32 tables cos, sin [seq, head_dim] (sparse_llm.model.rope.rope_tables): q, k, v, each
    [batch, heads, seq, head_dim]. Differentiable w.r.t. qkv."""
    _, seq, width = qkv.shape
    if width % (3 * n_heads) or (width // (3 * n_heads)) % 2:
        raise ValueError(f"qkv width {width} is not 3 x n_heads ({n_heads}) x an even head_dim")
    if cos.shape != (seq, width // (3 * n_heads)) or sin.shape != cos.shape:
        raise ValueError(f"rope tables {tuple(cos.shape)} / {tuple(sin.shape)} do not match "
                         f"(seq, head_dim) = ({seq}, {width // (3 * n_heads)})")
    if torch.compiler.is_compiling():
        # Inductor fuses the formula with its neighbours; the opaque op (running its formula fallback
        # in that run) made compiled 1B / 1.5B training steps 22% slower (H100, 2026-11-24)
        q, k, v = split_heads(qkv, n_heads)
        return rope_reference(q, cos, sin), rope_reference(k, cos, sin), v
    return torch.ops.sparse_llm.rope_qkv(qkv, cos, sin, n_heads)
