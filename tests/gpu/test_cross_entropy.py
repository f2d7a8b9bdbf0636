"""The cross-entropy kernel (kernels/cuda/cross_entropy.cu) against float64 PyTorch on fresh random
inputs: loss and gradient, bf16 / fp16 / float32, the paper's vocabulary and small ones, odd row
counts, ignored and out-of-range targets, extreme and constant rows, and poisoned outputs."""
import pytest
import torch
import torch.nn.functional as F

from sparse_llm.kernels import cross_entropy as ce
from sparse_llm.kernels.cross_entropy import IGNORE_INDEX, cross_entropy_sum
from tests.gpu.helpers import poison_cache, rel

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with -m gpu on the device)")]


def oracle(logits, targets):
    leaf = logits.detach().double().requires_grad_()
    loss = F.cross_entropy(leaf, targets, reduction="sum")
    loss.backward()
    return loss, leaf.grad


def check(logits, targets, scale=1.0):
    assert ce.kernel_supported(logits, targets)
    poison_cache()
    leaf = logits.detach().requires_grad_()
    loss = cross_entropy_sum(leaf, targets)
    (scale * loss).backward()
    want_loss, want_grad = oracle(logits, targets)
    assert abs(loss.item() - want_loss.item()) <= 1e-5 * abs(want_loss.item()) + 1e-3
    assert torch.isfinite(leaf.grad).all() and leaf.grad.dtype == logits.dtype
    assert rel(leaf.grad, scale * want_grad) <= (1e-2 if logits.dtype != torch.float32 else 1e-5)
    with torch.no_grad():
        assert cross_entropy_sum(logits, targets).item() == pytest.approx(want_loss.item(), rel=1e-5, abs=1e-3)
    return leaf.grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows,vocab", [(16384, 49152), (1027, 320), (3, 8), (1, 50304)])
def test_matches_float64_pytorch(dtype, rows, vocab):
    logits = (3 * torch.randn(rows, vocab, device="cuda")).to(dtype)
    targets = torch.randint(0, vocab, (rows,), device="cuda")
    check(logits, targets, scale=1 / 16384)


def test_ignored_rows_get_no_loss_and_no_gradient():
    logits = torch.randn(257, 1024, device="cuda", dtype=torch.bfloat16)
    targets = torch.randint(0, 1024, (257,), device="cuda")
    targets[::3] = IGNORE_INDEX
    grad = check(logits, targets)
    assert torch.all(grad[::3] == 0)


def test_adversarial_rows():
    vocab = 4096
    logits = torch.randn(6, vocab, device="cuda")
    logits[0] = 0.0                       # constant row: uniform softmax
    logits[1, 17] = 80.0                  # one dominant logit, the target
    logits[2] = -60.0                     # all very negative
    logits[3, ::2] = -1e4                 # half the row far below the rest
    logits[4] = torch.linspace(-30, 30, vocab, device="cuda")
    logits[5, -1] = 50.0                  # the largest logit in the last vector
    targets = torch.tensor([5, 17, vocab - 1, 0, 123, vocab - 1], device="cuda")
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        check(logits.to(dtype), targets)


def test_a_bad_target_gives_nan_and_infinities_propagate():
    logits = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    assert torch.isnan(cross_entropy_sum(logits, torch.tensor([0, 64, 1, 2], device="cuda")))
    logits[2, 5] = float("nan")
    assert torch.isnan(cross_entropy_sum(logits, torch.tensor([0, 1, 1, 2], device="cuda")))


def test_same_as_the_pytorch_path():
    logits = (2 * torch.randn(333, 2048, device="cuda")).to(torch.bfloat16)
    targets = torch.randint(0, 2048, (333,), device="cuda")
    targets[7] = IGNORE_INDEX
    kernel_loss, kernel_grad = torch.ops.sparse_llm.cross_entropy_loss_grad(logits, targets, True)
    ref_loss, ref_grad = ce.loss_grad_reference(logits, targets, True)
    assert kernel_loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    assert rel(kernel_grad, ref_grad) < 5e-3  # both bf16 roundings of the same float32 values


def test_captures_in_a_cuda_graph():
    logits = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16)
    targets = torch.randint(0, 512, (64,), device="cuda")
    torch.ops.sparse_llm.cross_entropy_loss_grad(logits, targets, True)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss, grad = torch.ops.sparse_llm.cross_entropy_loss_grad(logits, targets, True)
    logits.copy_(torch.randn_like(logits))
    graph.replay()
    want_loss, want_grad = oracle(logits, targets)
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-5)
    assert rel(grad, want_grad) < 1e-2
