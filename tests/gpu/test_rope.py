"""GPU tests of the fused qkv RoPE kernels against the float32 reference: bf16 and fp16, head dims
that fill a block unevenly, odd batch and sequence sizes, strided gradients, a head dim the kernels
do not take (the reference runs), opcheck, and the attention module end to end. Fresh random
inputs every call; outputs land in memory poisoned with NaN first."""
import pytest
import torch

from tests.gpu.helpers import poison_cache, rel

pytestmark = pytest.mark.gpu

if torch.cuda.is_available():
    from sparse_llm.kernels.rope import kernel_supported, rope_qkv, rope_reference, split_heads
    from sparse_llm.model.rope import rope_tables


def make_case(batch, seq, n_heads, head_dim, dtype):
    gen = torch.Generator(device="cuda").manual_seed(torch.seed() % 2**62)
    qkv = torch.randn(batch, seq, 3 * n_heads * head_dim, generator=gen, device="cuda").to(dtype)
    cos, sin = rope_tables(seq, head_dim, 10000.0, device="cuda")
    return qkv, cos, sin


def reference(qkv, cos, sin, n_heads, grads):
    """float32 q, k, v and d qkv of sum(q gq + k gk + v gv) by autograd through the reference."""
    leaf = qkv.detach().float().requires_grad_()
    q, k, v = split_heads(leaf, n_heads)
    outs = (rope_reference(q, cos, sin), rope_reference(k, cos, sin), v)
    (dqkv,) = torch.autograd.grad(outs, leaf, [g.float() for g in grads])
    return outs, dqkv


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch,seq,n_heads,head_dim", [(2, 2048, 4, 64), (3, 37, 5, 128), (1, 1, 2, 96),
                                                        (2, 19, 3, 4), (1, 5, 1, 1024)])
def test_against_float32_reference(dtype, batch, seq, n_heads, head_dim):
    qkv, cos, sin = make_case(batch, seq, n_heads, head_dim, dtype)
    assert kernel_supported(qkv, cos, batch, seq, n_heads, head_dim)
    leaf = qkv.clone().requires_grad_()
    poison_cache()
    q, k, v = rope_qkv(leaf, cos, sin, n_heads)
    grads = [torch.randn_like(q) for _ in range(3)]
    poison_cache()
    (dqkv,) = torch.autograd.grad((q, k, v), leaf, grads)
    (q_ref, k_ref, v_ref), dqkv_ref = reference(qkv, cos, sin, n_heads, grads)
    assert torch.equal(v, v_ref.to(dtype))
    assert rel(q, q_ref) < 5e-3 and rel(k, k_ref) < 5e-3
    assert rel(dqkv, dqkv_ref) < 5e-3
    assert torch.isfinite(dqkv).all() and torch.isfinite(q).all() and torch.isfinite(k).all()


def test_strided_gradients():
    # SDPA may hand back gradients in [batch, seq, heads, head_dim] memory; a sliced one is copied first
    batch, seq, n_heads, head_dim = 2, 33, 4, 64
    qkv, cos, sin = make_case(batch, seq, n_heads, head_dim, torch.bfloat16)
    shape = (batch, seq, n_heads, head_dim)
    dq = torch.randn(shape, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    dk = torch.randn(batch, seq, n_heads, 2 * head_dim, device="cuda", dtype=torch.bfloat16)[..., 1:head_dim + 1]
    dk = dk.transpose(1, 2)
    dv = torch.randn(batch, n_heads, seq, head_dim, device="cuda", dtype=torch.bfloat16)
    grad = torch.ops.sparse_llm.rope_qkv_bwd(dq, dk, dv, cos, sin)
    _, expected = reference(qkv, cos, sin, n_heads, [dq, dk, dv])
    assert rel(grad, expected) < 5e-3


def test_head_dim_the_kernels_do_not_take_runs_the_reference():
    qkv, cos, sin = make_case(2, 9, 3, 6, torch.bfloat16)
    assert not kernel_supported(qkv, cos, 2, 9, 3, 6)
    q, _, _ = rope_qkv(qkv, cos, sin, 3)
    assert rel(q, rope_reference(split_heads(qkv.float(), 3)[0], cos, sin)) < 5e-3


def test_opcheck_cuda():
    qkv, cos, sin = make_case(2, 17, 2, 64, torch.bfloat16)
    torch.library.opcheck(torch.ops.sparse_llm.rope_qkv.default, (qkv.requires_grad_(), cos, sin, 2))
    q, k, v = (torch.randn(2, 2, 17, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    torch.library.opcheck(torch.ops.sparse_llm.rope_qkv_bwd.default, (q, k, v, cos, sin))


def test_attention_matches_the_float32_module():
    from sparse_llm.model.attention import Attention

    torch.manual_seed(torch.seed() % 2**31)
    attention = Attention(256, 4).cuda()
    x = torch.randn(2, 128, 256, device="cuda")
    cos, sin = rope_tables(128, 64, 10000.0, device="cuda")
    expected = attention(x, cos, sin)  # float32: the reference path
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = attention(x, cos, sin)  # bf16: the kernels
    assert rel(got, expected) < 2e-2
