"""Cubins built ahead of time by nvcc (the Docker warm-up) load and compute the same FFN."""
import shutil

import pytest
import torch

from sparse_llm.kernels import loader, warmup
from sparse_llm.kernels.hybrid import hybrid_ffn
from sparse_llm.kernels.reference import ffn_reference_fp32
from sparse_llm.kernels.synthetic import make_synthetic_ffn
from sparse_llm.kernels.twell import twell_ffn

pytestmark = pytest.mark.gpu


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_prebuilt_cubins_load_and_compute(tmp_path, monkeypatch):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not on PATH")
    import cupy

    monkeypatch.setenv("SPARSE_LLM_KERNEL_CACHE", str(tmp_path))
    loader._module.cache_clear()
    loader._function.cache_clear()
    arch = loader.arch_flag(*torch.cuda.get_device_capability())
    warmup.warm([(256, 1024, True)], [torch.bfloat16], arch)
    loaded = []
    real = cupy.RawModule

    def spy(**kwargs):
        loaded.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(cupy, "RawModule", spy)
    try:
        syn = make_synthetic_ffn(999, 256, 1024, 12, device="cuda", seed=torch.seed() % 2**31)
        reference = ffn_reference_fp32(syn.x, syn.w_gate, syn.w_up, syn.w_down)
        assert rel(twell_ffn(syn.x, syn.w_gate, syn.w_up, syn.w_down), reference) < 1e-2
        x = syn.x.clone().requires_grad_()
        y, l1, _, _ = hybrid_ffn(x, syn.w_gate, syn.w_up, syn.w_down)
        assert rel(y, reference) < 1e-2
        (y.float().square().sum() + l1).backward()
        assert torch.isfinite(x.grad).all()
    finally:
        loader._module.cache_clear()
        loader._function.cache_clear()
    assert loaded and all(set(kwargs) == {"path"} for kwargs in loaded), loaded
