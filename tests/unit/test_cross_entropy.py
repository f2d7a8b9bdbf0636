"""The cross entropy whose gradient is made in the forward (kernels/cross_entropy.py), PyTorch path:
against F.cross_entropy's loss and autograd gradient, across chunk boundaries, ignored and
out-of-range targets, without autograd, and the custom op's registration (opcheck)."""
import shutil

import pytest
import torch
import torch.nn.functional as F

from sparse_llm.kernels import cross_entropy as ce
from sparse_llm.kernels.cross_entropy import IGNORE_INDEX, cross_entropy_sum


def expected_loss_and_grad(logits, targets):
    leaf = logits.detach().requires_grad_()
    loss = F.cross_entropy(leaf.double(), targets, reduction="sum")  # float64: the oracle
    loss.backward()
    return loss, leaf.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("rows,chunk", [(20, 1024), (20, 7), (21, 3), (1, 4)])
def test_loss_and_gradient_match_autograd(monkeypatch, dtype, rows, chunk):
    monkeypatch.setattr(ce, "REFERENCE_CHUNK_ROWS", chunk)
    generator = torch.Generator().manual_seed(rows * chunk)
    logits = (4 * torch.randn(rows, 11, generator=generator)).to(dtype).requires_grad_()
    targets = torch.randint(0, 11, (rows,), generator=generator)
    targets[::5] = IGNORE_INDEX
    loss = cross_entropy_sum(logits, targets)
    (grad,) = torch.autograd.grad(3.5 * loss, logits)
    want_loss, want_grad = expected_loss_and_grad(logits, targets)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-6, atol=1e-5)
    tolerance = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), 3.5 * want_grad.double(), **tolerance)
    assert torch.all(grad[::5] == 0)  # ignored rows


def test_without_autograd_only_the_loss_is_formed():
    logits = torch.randn(6, 5)
    targets = torch.tensor([0, 4, 2, IGNORE_INDEX, 1, 3])
    with torch.no_grad():
        loss = cross_entropy_sum(logits.requires_grad_(), targets)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, F.cross_entropy(logits.detach(), targets, reduction="sum"))
    assert ce.loss_grad_reference(logits.detach(), targets, False)[1].numel() == 0


def test_a_target_outside_the_vocabulary_gives_nan_not_a_wrong_number():
    logits = torch.randn(3, 5)
    assert torch.isnan(cross_entropy_sum(logits, torch.tensor([0, 5, 1])))
    assert torch.isnan(cross_entropy_sum(logits, torch.tensor([0, -1, 1])))
    assert torch.isfinite(cross_entropy_sum(logits, torch.tensor([0, IGNORE_INDEX, 4])))


def test_shapes_are_checked_by_name():
    with pytest.raises(ValueError, match="logits \\[rows, vocab\\] and targets \\[rows\\]"):
        cross_entropy_sum(torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        cross_entropy_sum(torch.randn(4, 5), torch.zeros(3, dtype=torch.long))


def test_a_second_backward_through_the_graph_fails_loudly():
    logits = torch.randn(4, 6, requires_grad=True)
    loss = cross_entropy_sum(logits, torch.tensor([1, 2, 3, 4]))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_the_custom_op_passes_opcheck():
    logits = torch.randn(5, 8)
    targets = torch.tensor([1, IGNORE_INDEX, 7, 0, 3])
    for with_grad in (True, False):
        torch.library.opcheck(torch.ops.sparse_llm.cross_entropy_loss_grad.default, (logits, targets, with_grad),
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH: cannot compile-check CUDA")
@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_nvcc_compiles(arch, dtype):
    from sparse_llm.kernels.loader import nvcc_compile_check

    (source, defines), = ce.kernel_variants(dtype)
    report = nvcc_compile_check(source, arch, defines)
    assert "error" not in report.lower() and "0 bytes spill stores" in report and "0 bytes stack frame" in report


def test_the_kernel_path_is_cuda_only():
    assert not ce.kernel_supported(torch.randn(4, 8), torch.zeros(4, dtype=torch.long))
