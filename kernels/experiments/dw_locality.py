"""Is hy_dw bound by DRAM re-reads of x and dy? Same pair count (29 active a token, 2048 x 5632,
bf16), three activation patterns:

- uniform: DESIGN section 11's synthetic rows (every unit's tokens spread over all N).
- banded: tokens in B blocks; unit j fires only inside block j * B // d_ff, so the units the running
  CTAs hold (consecutive j) read the same few hundred tokens: x and dy come from L2.
- banded_shuffled: the same blocks, but units assigned to blocks at random: each unit's tokens are
  close together, the running CTAs' are not.

If hy_dw's time per pair falls from uniform to banded, the re-reads (x and dy fetched from DRAM once
per wave of running units) are what it pays for, and more units in flight per CTA is the lever.

    PYTHONPATH=$PWD:/tmp/site python kernels/experiments/dw_locality.py [tokens] [blocks]
"""
import sys

import torch

from sparse_llm.kernels.bench_training import _main_kernel_ms
from sparse_llm.kernels.synthetic import SyntheticFFN, hybrid_training_step, make_synthetic_ffn

D_MODEL, D_FF, ACTIVE = 2048, 5632, 29.0


def make_banded(tokens: int, blocks: int, shuffle: bool, seed: int = 0) -> SyntheticFFN:
    gen = torch.Generator(device="cuda")
    gen.manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen, device="cuda")  # noqa: E731
    x = randn(tokens, D_MODEL)
    token_block = torch.arange(tokens, device="cuda") * blocks // tokens
    unit_block = torch.arange(D_FF, device="cuda") * blocks // D_FF
    if shuffle:
        unit_block = unit_block[torch.randperm(D_FF, generator=gen, device="cuda")]
    x[:, 1 : blocks + 1] = 0.0
    x[torch.arange(tokens, device="cuda"), 1 + token_block] = 1.0
    x[:, 0] = 1.0
    w_gate = randn(D_FF, D_MODEL) / D_MODEL**0.5
    w_gate[:, : blocks + 1] = 0.0
    boost = 8.0
    w_gate[torch.arange(D_FF, device="cuda"), 1 + unit_block] = boost
    pre = (x[:4096] @ w_gate.T).flatten()
    threshold = torch.quantile(pre[: 2**24], 1.0 - ACTIVE / D_FF)
    w_gate[:, 0] = -threshold
    w_up = randn(D_FF, D_MODEL) / D_MODEL**0.5
    w_down = randn(D_MODEL, D_FF) / D_FF**0.5
    cast = lambda t: t.to(torch.bfloat16).contiguous()  # noqa: E731
    return SyntheticFFN(cast(x), cast(w_gate), cast(w_up), cast(w_down))


def measure(name: str, syn: SyntheticFFN) -> None:
    gate = syn.x.float() @ syn.w_gate.float().t() > 0
    pairs = gate.sum().item()
    per_unit = gate.sum(0).float()
    step = hybrid_training_step(syn)
    ms = _main_kernel_ms(step)  # "hy_dw": the dW kernels of either design
    per = " ".join(f"{ms[k] * 1e6 / pairs:6.3f}" for k in ms)
    print(f"{name:16s} | {pairs / gate.shape[0]:5.1f} | {per_unit.mean():6.1f} {per_unit.max():6.0f} | {per} |"
          f" {ms['hy_dw']:.3f}", flush=True)


tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 16384
blocks = int(sys.argv[2]) if len(sys.argv) > 2 else 64
print(f"{tokens} tokens, {blocks} blocks")
print("pattern          | act/tok | unit mean max | ns/pair: hy_forward hy_dw hy_dx | hy_dw ms")
for round_ in range(2):
    measure("uniform", make_synthetic_ffn(tokens, D_MODEL, D_FF, ACTIVE, 0.0, torch.bfloat16, "cuda", 0))
    measure("banded", make_banded(tokens, blocks, shuffle=False))
    measure("banded_shuffled", make_banded(tokens, blocks, shuffle=True))
