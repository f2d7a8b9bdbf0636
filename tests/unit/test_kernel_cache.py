"""Ahead-of-time kernels: the warm-up builds with nvcc (no GPU) exactly the cubins the loader looks
up, and the loader loads a prebuilt cubin instead of compiling."""
import shutil
import sys
import types

import pytest
import torch

from sparse_llm.kernels import hybrid, loader, twell, warmup

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH (CUDA toolkit)")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_LLM_KERNEL_CACHE", str(tmp_path))
    loader._module.cache_clear()
    loader._function.cache_clear()
    yield tmp_path
    loader._module.cache_clear()
    loader._function.cache_clear()


@needs_nvcc
def test_warmup_builds_the_cubins_the_loader_looks_up(cache):
    variants = warmup.kernel_variants(256, 1024, True, torch.bfloat16)
    assert {source for source, _ in variants} == {"twell_pack.cu", "twell_ffn.cu", "twell_gate.cu", "hybrid.cu",
                                                  "rope.cu", "cross_entropy.cu", "row_order.cu"}
    gate_slots = {d["TW_SLOTS"] for s, d in variants if s == "twell_gate.cu"}
    assert gate_slots == {twell.DEFAULT_SLOTS, hybrid.GATE_SLOTS}  # inference's TwELL and training's hybrid gate
    assert "twell_gate.cu" not in {s for s, _ in warmup.kernel_variants(256, 1024, True, torch.bfloat16, "sm_80")}
    paths = warmup.warm([(256, 1024, True)], [torch.bfloat16], "sm_90a")
    assert all(p.is_file() and p.parent == cache and p.stat().st_size > 0 for p in paths)
    for source, defines in variants:
        assert loader.cubin_path(source, "sm_90a", defines) in paths
    assert warmup.warm([(256, 1024, True)], [torch.bfloat16], "sm_90a") == paths  # already built: no rebuild


def test_hybrid_is_skipped_for_shapes_it_does_not_take():
    assert {s for s, _ in warmup.kernel_variants(128, 512, True, torch.bfloat16)} == {
        "twell_pack.cu", "twell_ffn.cu", "twell_gate.cu", "rope.cu", "cross_entropy.cu", "row_order.cu"}


def test_opt_in_blocked_up_projection_is_warmed_when_enabled():
    from sparse_llm.kernels import twell

    twell.set_default_config(twell.FusedConfig(up_blocked=1))
    try:
        gated = {s for s, _ in warmup.kernel_variants(256, 1024, True, torch.bfloat16)}
        plain = {s for s, _ in warmup.kernel_variants(256, 1024, False, torch.bfloat16)}
    finally:
        twell.set_default_config(None)
    assert "twell_up.cu" in gated and "twell_up.cu" not in plain  # the gated FFN only


def test_cubin_name_changes_with_sources_defines_and_arch(cache):
    base = loader.cubin_path("twell_pack.cu", "sm_90a", {"TW_TILE": 256})
    assert base != loader.cubin_path("twell_pack.cu", "sm_80", {"TW_TILE": 256})
    assert base != loader.cubin_path("twell_pack.cu", "sm_90a", {"TW_TILE": 512})
    assert base == loader.cubin_path("twell_pack.cu", "sm_90a", (("TW_TILE", "256"),))


def test_loader_prefers_a_prebuilt_cubin(cache, monkeypatch):
    made = []

    class FakeRawModule:
        def __init__(self, **kwargs):
            made.append(kwargs)

    fake = types.SimpleNamespace(RawModule=FakeRawModule,
                                 cuda=types.SimpleNamespace(Device=lambda index: _NullContext()))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (9, 0))
    defines = (("TW_TILE", "256"),)
    loader._module(0, "twell_pack.cu", defines)
    assert "code" in made[-1]  # nothing prebuilt: NVRTC from source
    prebuilt = loader.cubin_path("twell_pack.cu", "sm_90a", defines)
    prebuilt.write_bytes(b"cubin")
    loader._module.cache_clear()
    loader._module(0, "twell_pack.cu", defines)
    assert made[-1] == {"path": str(prebuilt)}


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
