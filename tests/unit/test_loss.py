"""The cross entropy in chunks (parallel.loss_chunk_tokens) against one pass."""
import pytest
import torch

from sparse_llm.config import ConfigError, validate
from sparse_llm.train.loss import cross_entropy_sum
from tests.helpers import compose_config


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 3, 7, 19, 20, 64])
def test_chunks_give_the_one_pass_loss_and_gradient(dtype, chunk):
    generator = torch.Generator().manual_seed(chunk)
    logits = (3 * torch.randn(20, 11, generator=generator)).to(dtype).requires_grad_()
    targets = torch.randint(0, 11, (20,), generator=generator)
    expected = cross_entropy_sum(logits, targets)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    got = cross_entropy_sum(logits, targets, chunk)
    (grad,) = torch.autograd.grad(got, logits)
    assert got.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grad, expected_grad)


def test_negative_chunk_is_rejected_by_name():
    cfg = compose_config(["parallel.loss_chunk_tokens=-1"])
    with pytest.raises(ConfigError, match="parallel.loss_chunk_tokens"):
        validate(cfg)
