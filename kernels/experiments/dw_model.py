"""The weight-gradient kernels ("dW" below: hy_fill_au + hy_dwy + hy_dwx since v20; hy_dw before, and in
the two-pass experiment of NOTES_hybrid v17, commit 70f8700, the same three names) on a whole model's activations: bench_model's calibrated model (default 2b: d 2048, d_ff 5632,
16384 tokens a micro-batch) on its calibration micro-batch. Per FFN layer, the layer's own input and
weights go through one hybrid fwd+bwd (random dy): the per-unit token counts (mean, max, units split
over several items: >= DW_SPLIT_TOKENS) beside hy_forward / hy_dw / hy_dx device times, and hy_dw's time
at the uniform benchmark's rate per pair; and the row lengths (active units per token: max, rows long
enough to be split over warps in hy_forward / hy_dx). Where hy_dw runs far over that rate, its inputs (heavy units,
token order) and not its per-pair cost are what the model pays for.

    [DW_MODEL_SPLIT_ROWS=256,1024] [DW_MODEL_DW_SPLITS=256,1024] [DW_MODEL_PARTS=1] PYTHONPATH=$PWD:/tmp/site python kernels/experiments/dw_model.py [2b] [29] [layers ...]
"""
import os
import sys

import torch

from sparse_llm.kernels import hybrid
from sparse_llm.kernels.bench_training import _kernel_times
from sparse_llm.parallel.distributed import init_distributed, shutdown
from sparse_llm.study.bench_model import _ffn_inputs, _full, calibrate_gate_sparsity

from calibrated_model import model_trainer  # this folder's scripts run with it on sys.path

model_name = sys.argv[1] if len(sys.argv) > 1 else "2b"
target = float(sys.argv[2]) if len(sys.argv) > 2 else 29.0
only = {int(a) for a in sys.argv[3:]}
# SPLIT_ROWS values to time (the first one is the row printed); e.g. DW_MODEL_SPLIT_ROWS=256,1024
variants = [int(v) for v in os.environ.get("DW_MODEL_SPLIT_ROWS", str(hybrid.SPLIT_ROWS)).split(",")]
# DW_SPLIT_TOKENS values to time besides the default; e.g. DW_MODEL_DW_SPLITS=256,1024
dw_splits = [int(v) for v in os.environ.get("DW_MODEL_DW_SPLITS", "").split(",") if v]
# DW_MODEL_PARTS=1: print each dW kernel's time
UNIFORM_NS_PER_PAIR = 2.14  # hy_dw on the uniform benchmark, 16384 tokens (experiments/kernel_scaling.py)
hybrid.SPLIT_ROWS = variants[0]
world = init_distributed("cuda")


def kernel_ms(step, **knobs) -> list[float]:
    """hy_forward, dW and hy_dx device ms a call of `step`, with the hybrid module's `knobs` set for it (dW: the
    weight-gradient kernels of either design, so that one copy of this script times two trees)."""
    saved = {name: getattr(hybrid, name) for name in knobs}
    for name, value in knobs.items():
        setattr(hybrid, name, value)
    try:
        times = _kernel_times(step)
        dw = {k: times[k] for k in ("hy_dw", "hy_fill_au", "hy_dwy", "hy_dwx") if k in times}
        if os.environ.get("DW_MODEL_PARTS") == "1":  # the dW kernels one by one
            print("      dW kernels: " + ", ".join(f"{k} {ms:.3f}" for k, ms in dw.items()), flush=True)
        return [times.get("hy_forward", 0.0), sum(dw.values()), times.get("hy_dx", 0.0)]
    finally:
        for name, value in saved.items():
            setattr(hybrid, name, value)


with model_trainer(model_name, world) as trainer:
    tokens = trainer.train_loader.next_batch()[0].to(world.device)
    calibrate_gate_sparsity(trainer.model, tokens, target)
    print(f"{model_name}: {tokens.numel()} tokens; split units: >= {hybrid.DW_SPLIT_TOKENS} tokens")
    print(f"layer | pairs/token | unit tokens mean max split | rows max >={hybrid.SPLIT_ROW_UNITS} >=512 >=2048, pairs past the saved ELL | "
          "hy_forward dW hy_dx ms | hy_dw (v16) at uniform rate ms")
    totals = [0.0, 0.0]
    for layer, (ffn, x) in enumerate(_ffn_inputs(trainer.model, tokens)):
        if only and layer not in only:
            continue
        x = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        weights = [_full(m.weight).detach().to(torch.bfloat16) for m in (ffn.gate, ffn.up, ffn.down)]
        active = (x @ weights[0].T) > 0
        units, rows = active.sum(0).float(), active.sum(1).float()
        del active
        leaves = [t.detach().clone().requires_grad_() for t in [x] + weights]
        dy = torch.randn_like(x)
        dl1 = torch.tensor(0.1, device=x.device)

        def step():
            y, l1, _, _ = hybrid.hybrid_ffn(*leaves)
            return torch.autograd.grad([y, l1], leaves, [dy, dl1])

        for split_rows in variants[1:]:  # other bounds on the split rows first, for comparison
            ms = kernel_ms(step, SPLIT_ROWS=split_rows)
            print(f"{layer:5d} | split_rows {split_rows}: {ms[0]:.3f} {ms[1]:.3f} {ms[2]:.3f}", flush=True)
        for split_tokens in dw_splits:  # other unit splits, for comparison
            ms = kernel_ms(step, DW_SPLIT_TOKENS=split_tokens)
            print(f"{layer:5d} | dw split {split_tokens}: {ms[0]:.3f} {ms[1]:.3f} {ms[2]:.3f}", flush=True)
        ms = kernel_ms(step)
        pairs = units.sum().item()
        uniform = pairs * UNIFORM_NS_PER_PAIR / 1e6
        totals[0] += ms[1]
        totals[1] += uniform
        print(f"{layer:5d} | {pairs / x.shape[0]:5.1f} | {units.mean():6.1f} {units.max():6.0f} "
              f"{int((units >= hybrid.DW_SPLIT_TOKENS).sum()):4d} | {rows.max():5.0f} "
              f"{int((rows >= hybrid.SPLIT_ROW_UNITS).sum()):4d} {int((rows >= 512).sum()):4d} {int((rows >= 2048).sum()):3d} "
              f"{100 * (rows - hybrid.DEFAULT_ELL_WIDTH).clamp(min=0).sum().item() / max(pairs, 1):4.1f}% | {ms[0]:.3f} {ms[1]:.3f} {ms[2]:.3f} | {uniform:.3f}",
              flush=True)
    print(f"dW total {totals[0]:.2f} ms; hy_dw (v16) at the uniform rate {totals[1]:.2f} ms")
shutdown()
