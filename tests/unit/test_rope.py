"""The fused qkv RoPE op on CPU: its reference path, autograd, opcheck and the model's use of it."""
import shutil

import pytest
import torch

from sparse_llm.kernels.rope import rope_qkv, rope_reference, split_heads
from sparse_llm.model.rope import rope_tables


def make_case(batch=2, seq=7, n_heads=3, head_dim=8, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, seq, 3 * n_heads * head_dim, generator=generator).to(dtype)
    cos, sin = rope_tables(seq, head_dim, 10000.0)
    return qkv, cos, sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_the_split_and_rotation_it_replaces(dtype):
    qkv, cos, sin = make_case(dtype=dtype)
    q, k, v = rope_qkv(qkv, cos, sin, 3)
    q_ref, k_ref, v_ref = split_heads(qkv, 3)
    assert torch.equal(q, rope_reference(q_ref, cos, sin)) and torch.equal(k, rope_reference(k_ref, cos, sin))
    assert torch.equal(v, v_ref) and all(t.transpose(1, 2).is_contiguous() and t.dtype == dtype for t in (q, k, v))


def test_rotation_is_relative():
    # the point of RoPE: q_m . k_n depends on m - n only
    head_dim, seq = 16, 12
    cos, sin = rope_tables(seq, head_dim, 10000.0)
    vec_q, vec_k = torch.randn(head_dim, dtype=torch.float64), torch.randn(head_dim, dtype=torch.float64)
    qkv = torch.zeros(1, seq, 3 * head_dim, dtype=torch.float64)
    qkv[0, :, :head_dim], qkv[0, :, head_dim:2 * head_dim] = vec_q, vec_k
    q, k, _ = rope_qkv(qkv, cos, sin, 1)
    scores = q[0, 0] @ k[0, 0].T
    for shift in range(seq):
        diagonal = torch.diagonal(scores, -shift)
        torch.testing.assert_close(diagonal, diagonal[:1].expand_as(diagonal), rtol=1e-5, atol=1e-5)


def test_gradcheck():
    qkv, cos, sin = make_case(batch=1, seq=5, n_heads=2, head_dim=4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: rope_qkv(t, cos, sin, 2), (qkv.requires_grad_(),))


def test_backward_is_the_inverse_rotation():
    # the rotation is orthogonal: the gradient of sum(out * g) is g rotated back
    qkv, cos, sin = make_case(dtype=torch.float64)
    q, k, v = rope_qkv(qkv, cos, sin, 3)
    grad = torch.ops.sparse_llm.rope_qkv_bwd(q, k, v, cos, sin)
    torch.testing.assert_close(grad, qkv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    qkv, cos, sin = make_case(dtype=dtype)
    torch.library.opcheck(torch.ops.sparse_llm.rope_qkv.default, (qkv.requires_grad_(), cos, sin, 3))
    q, k, v = (torch.randn(2, 3, 7, 8).to(dtype) for _ in range(3))
    k = k.transpose(1, 2).contiguous().transpose(1, 2)  # a gradient in [batch, seq, heads, head_dim] memory
    torch.library.opcheck(torch.ops.sparse_llm.rope_qkv_bwd.default, (q, k, v, cos, sin))


def test_bad_shapes_name_the_mismatch():
    qkv, cos, sin = make_case()
    with pytest.raises(ValueError, match="n_heads"):
        rope_qkv(qkv, cos, sin, 5)
    with pytest.raises(ValueError, match="rope tables"):
        rope_qkv(qkv, cos[:3], sin[:3], 3)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH: cannot compile-check CUDA")
@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nvcc_compiles(arch, dtype):
    from sparse_llm.kernels import rope
    from sparse_llm.kernels.loader import nvcc_compile_check

    (source, defines), = rope.kernel_variants(dtype)
    report = nvcc_compile_check(source, arch, defines)
    assert "error" not in report.lower() and "0 bytes spill stores" in report


def test_compiled_traces_the_formula():
    # under torch.compile the formula is traced (Inductor fuses it), not the opaque op
    qkv, cos, sin = make_case()
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    compiled = torch.compile(lambda t: rope_qkv(t, cos, sin, 3), backend=backend, fullgraph=True)
    for got, expected in zip(compiled(qkv), rope_qkv(qkv, cos, sin, 3)):
        torch.testing.assert_close(got, expected)
    assert "rope_qkv" not in graphs[0].code
