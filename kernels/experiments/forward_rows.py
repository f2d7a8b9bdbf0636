"""Does the TwELL fused stage wait on long rows in a whole model's inference forward? bench_model's
calibrated model on its calibration micro-batch (what `_time_forward` times): per layer, the row
lengths (active units per token: mean, max, rows of >= 128 and >= 512 units) beside the layer's
gate-kernel and fused-kernel device times from one profiled forward. A fused stage that runs far
longer than its pairs at the rate of the uniform benchmark (about 4.2 ms per 131072 x 29.4 pairs)
is held up by its longest rows, which one team walks alone.

    PYTHONPATH=$PWD:/tmp/site python kernels/experiments/forward_rows.py [0p5b] [29]
"""
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from sparse_llm.model.ffn import FeedForward
from sparse_llm.parallel.distributed import init_distributed, shutdown
from sparse_llm.study.bench_model import calibrate_gate_sparsity, gate_activity

from calibrated_model import model_trainer  # this folder's scripts run with it on sys.path

model_name = sys.argv[1] if len(sys.argv) > 1 else "0p5b"
target = float(sys.argv[2]) if len(sys.argv) > 2 else 29.0
UNIFORM_MS_PER_PAIR = 4.2 / (131072 * 29.4)  # the fused stage on the uniform benchmark (NOTES_twell v8)
world = init_distributed("cuda")

with model_trainer(model_name, world) as trainer:
    tokens = trainer.train_loader.next_batch()[0].to(world.device)
    calibrate_gate_sparsity(trainer.model, tokens, target)
    rows = [active.sum(1).float() for active in gate_activity(trainer.model, tokens)]
    model = trainer.model
    for module in model.modules():
        if isinstance(module, FeedForward) and module.kernel != "torch":
            module.kernel = "twell"
    model.eval()
    with torch.no_grad():
        for _ in range(3):
            model(tokens)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(tokens)
            torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    fused = [e.device_time / 1e3 for e in kernels if e.name == "twell_ffn_fused"]
    gate = [e.device_time / 1e3 for e in kernels if e.name in ("twell_gate_pack", "twell_pack")]
    total = sum(e.device_time for e in kernels) / 1e3
    print(f"{model_name}: one forward of {tokens.numel()} tokens, kernels {total:.2f} ms; TwELL layers: "
          f"{len(fused)} of {len(rows)}")
    print("layer | rows mean max >=128 >=512 | gate ms | fused ms | fused at the uniform rate ms")
    for layer, lengths in enumerate(rows):
        f = fused[layer] if layer < len(fused) else float("nan")
        g = gate[layer] if layer < len(gate) else float("nan")
        print(f"{layer:5d} | {lengths.mean():.1f} {lengths.max():.0f} {int((lengths >= 128).sum())} "
              f"{int((lengths >= 512).sum())} | {g:.3f} | {f:.3f} | {lengths.sum().item() * UNIFORM_MS_PER_PAIR:.3f}",
              flush=True)
shutdown()
