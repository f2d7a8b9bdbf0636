"""Whole-model benchmark, dense vs sparse, measured in one run on one GPU:
training step (tokens/s/GPU, MFU, peak memory, energy per token) and inference forward.

    python -m sparse_llm.study.bench_model --models 0p5b 1b --active 29 [--steps 20] [--gpus 1 2] [override ...]

With `--gpus 1 2` each configuration also runs under torchrun on 2 GPUs (FSDP2, one micro-batch
per GPU a step): tokens/s/GPU, scaling efficiency against one GPU, peak memory of the fullest GPU,
and energy per token summed over all GPUs.

Until trained sparse models exist, the sparse model's FFN gates are given a controlled sparsity
(DESIGN.md section 11, adapted to a whole model): embedding channel 0 is set to a constant, and
each layer's gate column 0 is set, one layer after the other, to the weight (found by bisection on
a whole micro-batch) that leaves `--active` units per token on average. Training then runs at a
learning rate of 1e-12, which leaves the fp32 weights unchanged, and every step trains on the
calibration micro-batch, so the timed steps run at the given activity (at 1e-7 the 1.5B model's deep
layers fell from 29 to 2-10 active units in 12 steps: kernels/experiments/calib_check.py; other
micro-batches than the calibration one differ by about +-30% a layer, up to 43-82 units in the 1.5B
model's last layers: kernels/experiments/row_lengths.py). The result's `timed_layer_active` is what
the timed steps measured. One micro-batch (micro_batch_size x seq_len tokens) per GPU a step, or
`--micro-batches N` accumulated into each optimizer step: the optimizer's update and the gradient
clipping, the same for dense and sparse, then weigh 1/N as much per token. The 2B recipe
(tokens_per_step 1048576) on a node of 8 GPUs takes 8 micro-batches of 8 x 2048 per GPU a step.
Each configuration runs in its own process (clean memory statistics).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

VARIANTS = {
    "dense": ["sparsity=dense", "kernel=torch"],
    "sparse_torch": ["sparsity=l1", "kernel=torch"],
    "sparse_kernel": ["sparsity=l1", "kernel=hybrid"],
}


@torch.no_grad()
@torch.compiler.set_stance("force_eager")  # compiled blocks would not run the capture hook below
def calibrate_gate_sparsity(model, tokens: torch.Tensor, mean_active: float) -> list[float]:
    """Give every layer's gate about `mean_active` active units per token on `tokens`; returns the
    measured mean active units per layer."""
    from sparse_llm.model.ffn import FeedForward
    from sparse_llm.parallel.fsdp import reshard

    reshard(model)  # edits below must reach the sharded parameters (see `reshard`)
    _local(model.embed.weight)[:, 0] = 1.0  # every shard (rows of the vocabulary) holds column 0
    ffns = [m for m in model.modules() if isinstance(m, FeedForward)]
    captured = {}
    hook = None
    measured = []
    for index, ffn in enumerate(ffns):
        hook = ffn.register_forward_pre_hook(lambda module, args: captured.__setitem__("x", args[0].detach()))
        model(tokens)
        hook.remove()
        reshard(model)
        x = captured["x"].reshape(-1, captured["x"].shape[-1]).float()
        weight = _full(ffn.gate.weight).float()
        rest = x[:, 1:] @ weight[:, 1:].T
        column = _column_for(rest, x[:, 0], mean_active)
        local = _local(ffn.gate.weight)
        local[:, 0] = column.to(local.dtype)
        measured.append(float(((rest + x[:, :1] * column) > 0).sum(1).float().mean()))
    return measured


def _column_for(rest: torch.Tensor, x0: torch.Tensor, mean_active: float, iterations: int = 60) -> torch.Tensor:
    """The gate weight c on channel 0 for which units fire (rest[t, j] + x0[t] c > 0) on `mean_active`
    units per token on average, by bisection. Channel 0 dominates the FFN input in early layers only;
    in deep ones x0 varies across tokens and can be negative, so no single quantile gives c."""
    bound = 100.0 * float(rest.abs().max()) / max(float(x0.abs().mean()), 1e-30)
    low, high = -bound, bound
    for _ in range(iterations):
        middle = 0.5 * (low + high)
        active = float(((rest + x0[:, None] * middle) > 0).sum(1, dtype=torch.float64).mean())
        low, high = (low, middle) if active > mean_active else (middle, high)
    return torch.tensor(0.5 * (low + high), device=rest.device)


@torch.no_grad()
@torch.compiler.set_stance("force_eager")  # hooks inside compiled blocks are traced, not run as written
def _ffn_inputs(model, tokens: torch.Tensor) -> list:
    """(FFN module, its input) of every FFN layer, in order, from one forward of `tokens`."""
    from sparse_llm.model.ffn import FeedForward

    ffns = [m for m in model.modules() if isinstance(m, FeedForward)]
    inputs = []
    hooks = [ffn.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach())) for ffn in ffns]
    try:
        model(tokens)
    finally:
        for hook in hooks:
            hook.remove()
    return list(zip(ffns, inputs))


@torch.no_grad()
def gate_activity(model, tokens: torch.Tensor):
    """Per FFN layer, in order: the bool [tokens, d_ff] pattern of the units whose gate fires on
    `tokens` (the layer's input times its gate weight, in the weight's dtype), made one at a time."""
    for ffn, x in _ffn_inputs(model, tokens):
        weight = _full(ffn.gate.weight)
        yield (x.reshape(-1, x.shape[-1]).to(weight.dtype) @ weight.T) > 0


def _full(param: torch.Tensor) -> torch.Tensor:
    """The whole of an FSDP2 parameter (the parameter itself when unsharded)."""
    return param.full_tensor() if hasattr(param, "full_tensor") else param


def _local(param: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 parameter (the parameter itself when unsharded)."""
    return param.to_local() if hasattr(param, "to_local") else param


def run_one(overrides: list[str], steps: int, warmup: int, active: float, keep: str | None = None,
            micro_batches: int = 1) -> dict:
    from sparse_llm.config import compose_config, validate
    from sparse_llm.parallel.distributed import init_distributed, shutdown
    from sparse_llm.train.energy import EnergyMeter, EnergyUnavailable, nvml_energy_reader
    from sparse_llm.train.run import build_trainer
    from sparse_llm.train.trainer import Callback

    with tempfile.TemporaryDirectory() as scratch:
        tmp = keep or scratch  # --keep DIR keeps the run directory (profiler traces, metrics)
        cfg = compose_config(overrides + [
            "data=synthetic", "eval_batches=0", "logging.wandb.mode=disabled", "checkpoint.resume=false",
            f"output_dir={tmp}", f"max_steps={warmup + steps}", "checkpoint.interval=1000000",
            f"logging.interval={warmup + steps}", "optim.lr=1e-12", "schedule.warmup_steps=0",
            "telemetry.energy=false"])
        world = init_distributed("cuda")
        cfg.tokens_per_step = micro_batches * cfg.micro_batch_size * cfg.model.seq_len * world.size
        validate(cfg, world.size)
        trainer = build_trainer(cfg, world)
        batch = trainer.train_loader.next_batch()  # a whole micro-batch: sequences differ
        # every step trains on the calibration micro-batch, so the timed steps run at the calibrated
        # activity (other micro-batches differ by about +-30% a layer, up to 80 units in deep layers)
        trainer.train_loader.next_batch = lambda: batch
        tokens = batch[0].to(world.device)
        layer_active = calibrate_gate_sparsity(trainer.model, tokens, active) if cfg.sparsity.ffn != "swiglu" else []
        try:
            meter = EnergyMeter(nvml_energy_reader(world.device))
        except EnergyUnavailable:
            meter = None
        marks = {}

        class Timer(Callback):
            def on_step_end(self, trainer, step, metrics):
                if step in (warmup, warmup + steps):
                    torch.cuda.synchronize()
                    marks[step] = (time.perf_counter(), meter.delta_mj() if meter else 0)

        trainer.callbacks.append(Timer())
        torch.cuda.reset_peak_memory_stats()
        last = trainer.fit()
        train_s = marks[warmup + steps][0] - marks[warmup][0]
        train_tokens = steps * cfg.tokens_per_step  # all GPUs
        train_mj = _sum_over_ranks(marks[warmup + steps][1], world.device)
        result = {
            "overrides": overrides, "gpus": world.size, "micro_batches": micro_batches,
            "train_tokens_per_s": train_tokens / train_s / world.size,
            "train_peak_gib": _max_over_ranks(torch.cuda.max_memory_allocated() / 2**30, world.device),
            # > 0: the allocator ran out, freed its cache and retried (a memory-starved, slower step)
            "alloc_retries": _max_over_ranks(torch.cuda.memory_stats().get("num_alloc_retries", 0), world.device),
            "train_mj_per_token": train_mj / train_tokens if meter else None,
            "mfu": _mfu(train_tokens / train_s / world.size, cfg, world.device),
            "active_per_token": last.get("sparsity/active_per_token/mean"),
            "calibrated_active": layer_active,
            "timed_layer_active": [last.get(f"sparsity/layer_{i}/active_per_token") for i in range(len(layer_active))],
        }
        result.update(_time_forward(trainer.model, tokens, world, meter))
        trainer.logger.close()
        shutdown()
    return result


def _sum_over_ranks(value: float, device) -> float:
    from sparse_llm.parallel.distributed import all_reduce_sum

    return float(all_reduce_sum(torch.tensor([float(value)], dtype=torch.float64, device=device)).item())


def _max_over_ranks(value: float, device) -> float:
    import torch.distributed as dist

    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def _mfu(tokens_per_s: float, cfg, device) -> float | None:
    """Dense-equivalent model FLOP/s over the device's bf16 peak, for the timed steps only."""
    from sparse_llm.model.flops import flops_per_token
    from sparse_llm.train.telemetry import lookup_peak_tflops

    peak, _ = lookup_peak_tflops(torch.cuda.get_device_name(device), cfg.hardware)
    return tokens_per_s * flops_per_token(cfg.model, cfg.sparsity.ffn) / (peak * 1e12) if peak else None


@torch.no_grad()
def _time_forward(model, tokens: torch.Tensor, world, meter, min_seconds: float = 3.0) -> dict:
    """Inference forward of the calibration micro-batch `tokens` (so at the calibrated sparsity; TwELL
    where the kernel mode is sparse): tokens/s per GPU, energy per token summed over GPUs. The timed
    window holds at least 10 forwards and lasts about `min_seconds` (the same count on every rank),
    so that NVML's energy counter, updated every few tens of ms, is read over a long enough span."""
    from sparse_llm.model.ffn import FeedForward

    for module in model.modules():
        if isinstance(module, FeedForward) and module.kernel != "torch":
            module.kernel = "twell"
    model.eval()
    device = world.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        model(tokens)
    sync()
    start = time.perf_counter()
    model(tokens)
    sync()
    one = time.perf_counter() - start
    repeats = int(_max_over_ranks(max(10, math.ceil(min_seconds / max(one, 1e-6))), device))
    if meter:
        meter.delta_mj()
    start = time.perf_counter()
    for _ in range(repeats):
        model(tokens)
    sync()
    seconds = time.perf_counter() - start
    n = repeats * tokens.numel()
    mj = _sum_over_ranks(meter.delta_mj(), device) if meter else None
    return {"forward_tokens_per_s": n / seconds, "forward_mj_per_token": mj / (n * world.size) if meter else None,
            "forward_repeats": repeats}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["0p5b", "1b", "1p5b", "2b"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--active", type=float, default=29.0, help="mean active units per token (sparse variants)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--micro-batches", type=int, default=1,
                        help="micro-batches accumulated per GPU into each timed optimizer step")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1], help="GPU counts to run each configuration on")
    parser.add_argument("--keep", help="keep each run directory under this folder (e.g. with telemetry.profile_steps=3)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write all results to this file")
    args, overrides = parser.parse_known_args(argv)
    if args.micro_batches < 1:
        parser.error(f"--micro-batches={args.micro_batches}: give 1 or more micro-batches a step")
    if args.one:
        result = run_one(overrides, args.steps, args.warmup, args.active, args.keep, args.micro_batches)
        if os.environ.get("RANK", "0") == "0":
            print("RESULT " + json.dumps(result), flush=True)
        return
    rows = []
    for model in args.models:
        for variant in args.variants:
            for gpus in args.gpus:
                row = _run_configuration(model, variant, gpus, args, overrides)
                if row:
                    rows.append(row)
                    print(_row_text(row, rows), flush=True)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(rows, file, indent=1)


def _run_configuration(model: str, variant: str, gpus: int, args, overrides: list[str]) -> dict | None:
    """One configuration in its own process (or torchrun world): clean memory statistics."""
    from sparse_llm.study.multi_gpu import launch_env, launcher

    cmd = [*launcher(gpus), "-m", "sparse_llm.study.bench_model", "--one", f"--steps={args.steps}", f"--warmup={args.warmup}",
           f"--micro-batches={args.micro_batches}", f"--active={args.active}", f"model={model}", *VARIANTS[variant], *overrides]
    if args.keep:
        cmd.append(f"--keep={Path(args.keep) / f'{model}-{variant}-{gpus}gpu'}")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=launch_env())
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        print(f"{model} {variant} {gpus} GPU(s): failed\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    return {"model": model, "variant": variant, **json.loads(lines[-1][7:])}


def _row_text(row: dict, rows: list[dict]) -> str:
    """One result line: ratios against the dense row of the same model and GPU count; with several
    GPUs, the scaling efficiency (tokens/s/GPU against the same configuration on one GPU)."""
    gpus = row.get("gpus", 1)
    same = lambda variant, n: next((r for r in rows if r["model"] == row["model"] and r["variant"] == variant  # noqa: E731
                                    and r.get("gpus", 1) == n), None)
    dense = same("dense", gpus)
    ratio = lambda key: f"{row[key] / dense[key]:.3f}x" if dense and row.get(key) and dense.get(key) else "-"  # noqa: E731
    energy = row.get("forward_mj_per_token")
    single = same(row["variant"], 1) if gpus > 1 else None
    scaling = f" scaling {row['train_tokens_per_s'] / single['train_tokens_per_s']:.1%}" if single else ""
    retries = f" alloc retries {row['alloc_retries']:.0f}" if row.get("alloc_retries") else ""
    train_energy = row.get("train_mj_per_token")
    train_energy_text = "" if train_energy is None else f"{train_energy:.3f} mJ/tok ({ratio('train_mj_per_token')}) "
    accumulated = f" x{row['micro_batches']}mb" if row.get("micro_batches", 1) > 1 else ""
    return (f"{row['model']:>5} {row['variant']:>13} {gpus}gpu{accumulated} | train {row['train_tokens_per_s']:>9.0f} tok/s/gpu "
            f"({ratio('train_tokens_per_s')}){scaling} "
            f"peak {row['train_peak_gib']:5.1f} GiB ({ratio('train_peak_gib')}){retries} {train_energy_text}"
            f"mfu {row['mfu'] or 0:.3f} active {row['active_per_token'] or 0:.1f} | forward "
            f"{row['forward_tokens_per_s']:>9.0f} tok/s ({ratio('forward_tokens_per_s')}) "
            f"{'' if energy is None else f'{energy:.3f} mJ/tok'} ({ratio('forward_mj_per_token')})")


if __name__ == "__main__":
    main(sys.argv[1:])
