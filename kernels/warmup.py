"""Compile the CUDA kernels ahead of time, without a GPU, for the FFN shapes of model configs:

    python -m sparse_llm.kernels.warmup [--arch sm_90a] [--models tiny 1b ...] [--dtypes bf16]

Each module a training step (hybrid, RoPE, the loss) or an inference forward (TwELL) of those shapes would compile
at run time is built by nvcc into $SPARSE_LLM_KERNEL_CACHE, where `loader.get_kernel` finds it by
the hash of (sources, defines, arch). The Dockerfile runs this at build time; anything it did not
cover is still compiled by NVRTC on first use.
"""
from __future__ import annotations

import argparse
import sys

import torch

from sparse_llm.kernels import cross_entropy, hybrid, rope, row_order, twell
from sparse_llm.kernels.loader import compile_cubin, kernel_cache_dir

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def kernel_variants(d_model: int, d_ff: int, gated: bool, dtype: torch.dtype,
                    arch: str = "sm_90a") -> list[tuple[str, dict[str, int]]]:
    variants = (twell.kernel_variants(d_model, d_ff, gated, dtype, arch) + rope.kernel_variants(dtype)
                + cross_entropy.kernel_variants(dtype) + row_order.kernel_variants())
    if hybrid.shape_supported(d_model, d_ff):
        variants += hybrid.kernel_variants(d_model, d_ff, gated, dtype, arch)
    return variants


def warm(shapes: list[tuple[int, int, bool]], dtypes: list[torch.dtype], arch: str) -> list:
    """Build every module of these (d_model, d_ff, gated) shapes; returns the cubin paths."""
    unique = {}
    for d_model, d_ff, gated in shapes:
        for dtype in dtypes:
            for source, defines in kernel_variants(d_model, d_ff, gated, dtype, arch):
                unique[(source, tuple(sorted(defines.items())))] = (source, defines)
    paths = []
    for index, (source, defines) in enumerate(unique.values(), 1):
        paths.append(compile_cubin(source, arch, defines))
        print(f"[{index}/{len(unique)}] {source} {defines} -> {paths[-1].name}", flush=True)
    return paths


def main(argv: list[str]) -> None:
    from sparse_llm.config import compose_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sm_90a", help="target, e.g. sm_90a (H100/H200), sm_80 (A100)")
    parser.add_argument("--models", nargs="+", default=["tiny", "small", "125m", "0p5b"],
                        help="conf/model names whose FFN shapes to build (the paper's scales share 0p5b's)")
    parser.add_argument("--ffn", nargs="+", default=["relu_gated"], choices=["relu_gated", "relu"])
    parser.add_argument("--dtypes", nargs="+", default=["bf16"], choices=list(DTYPES))
    args = parser.parse_args(argv)
    shapes = []
    for name in args.models:
        model = compose_config([f"model={name}"]).model
        shapes += [(model.d_model, model.d_ff, kind == "relu_gated") for kind in args.ffn]
    paths = warm(sorted(set(shapes)), [DTYPES[d] for d in args.dtypes], args.arch)
    print(f"{len(paths)} kernel modules for {args.arch} in {kernel_cache_dir()}")


if __name__ == "__main__":
    main(sys.argv[1:])
