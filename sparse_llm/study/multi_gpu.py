"""Multi-GPU checks on one machine, each a real `train.py` launch (torchrun for several GPUs):

1. parity: the same global batch on 1 GPU (gradient accumulation) and on N GPUs gives the same
   per-step losses to bf16 noise, dense and sparse; the per-layer sparsity statistics, the kernel
   overflow counts and the energy are reduced over the ranks, so they match the one-GPU run too;
2. kill and auto-resume: the N-GPU sparse run is killed (SIGKILL) after its first checkpoint and
   the same command relaunched; the loss curve continues the uninterrupted run's;
3. resume onto one GPU: a stop file ends the N-GPU sparse run (finish the step, save, exit 0) and
   `python train.py` on one GPU continues it from that checkpoint.

    python -m sparse_llm.study.multi_gpu --gpus 2 [--model 125m] [--steps 30] [--json out.json] [override ...]

`--device cpu` runs the same launches as N gloo processes (a check of the runner, e.g. with
`--model tiny --sparse-kernel torch`). Exit status 1 when a check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sparse_llm.config import compose_config
from sparse_llm.data import DEFAULT_ROOT, ensure_default_corpus, load_manifest

REPO = Path(__file__).resolve().parents[2]
# NVLink multicast stays off on the lent machines (it can take shared GPUs out of service)
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
# Two bf16 GPU runs of the same steps are not bit-identical (e.g. attention's backward accumulates
# with atomics), and a loss spike amplifies that noise for a step or two: the curves must agree on
# average and never drift apart, not at every step to a fixed digit.
CURVE_MEAN_RTOL = 5e-3
CURVE_MAX_RTOL = 5e-2
REPLAY_RTOL = 1e-3  # the same checkpoint, the same batches, twice: only the nondeterministic kernels differ
ACTIVE_ATOL = 2e-2  # per-layer active fraction
CHECKPOINT_INTERVAL = 10


def launcher(gpus: int) -> list[str]:
    """The command prefix that runs a Python script or module on `gpus` local processes."""
    if gpus == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}"]


def launch_env(**extra: str) -> dict[str, str]:
    """This environment with NVLink multicast off, plus `extra`."""
    return {**os.environ, **MULTICAST_OFF, **extra}


class Runner:
    def __init__(self, root: Path, device: str, micro_batch: int, seq_len: int, gpus: int, base: list[str]):
        self.root, self.device, self.gpus = root, device, gpus
        self.base = base + [f"device={device}", f"micro_batch_size={micro_batch}",
                            f"tokens_per_step={micro_batch * seq_len * gpus}", f"output_dir={root}"]

    def start(self, run_name: str, gpus: int, overrides: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        cmd = [*launcher(gpus), str(REPO / "train.py"), *self.base, f"run_name={run_name}", *overrides]
        with open(self.root / f"{run_name}.log", "a") as log:  # the child keeps its own handle
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    env=launch_env(WANDB_MODE="disabled", **(env or {})))

    def run(self, run_name: str, gpus: int, overrides: list[str], env: dict[str, str] | None = None) -> None:
        code = self.start(run_name, gpus, overrides, env).wait()
        if code != 0:
            raise RuntimeError(f"{run_name} on {gpus} GPU(s) exited {code}; see {self.root / run_name}.log")

    def wait_for_step(self, proc: subprocess.Popen, run_name: str, step: int, timeout_s: float = 900) -> None:
        deadline = time.monotonic() + timeout_s
        while last_step(self.root / run_name) < step:
            if proc.poll() is not None:
                raise RuntimeError(f"{run_name} exited {proc.returncode} before step {step}; see {self.root / run_name}.log")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{run_name} did not reach step {step} in {timeout_s:.0f} s")
            time.sleep(0.2)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once, as a failing node would."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    doomed, todo = [], [pid]
    while todo:
        doomed.append(todo.pop())
        todo.extend(children.get(doomed[-1], []))
    for victim in doomed:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass


def read_metrics(run_dir: Path) -> dict[int, dict]:
    """Logged rows by step; a step logged twice (before a kill and after the resume) keeps the later row."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    rows = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[int(row["step"])] = row
    return rows


def resumed_step(log: Path) -> int | None:
    """The step of the last "resumed from ... (step N)" line of a run's log."""
    steps = re.findall(r"resumed from \S+ \(step (\d+)\)", log.read_text())
    return int(steps[-1]) if steps else None


def last_step(run_dir: Path) -> int:
    return max(read_metrics(run_dir), default=0)


def loss_diff(reference: dict[int, dict], other: dict[int, dict], steps) -> dict[str, float]:
    """Mean and max relative difference of the two runs' losses over `steps` (both must have them)."""
    missing = [s for s in steps if s not in reference or s not in other]
    if missing:
        raise RuntimeError(f"steps {missing[:5]} were not logged by both runs")
    diffs = [abs(other[s]["loss/ce"] - reference[s]["loss/ce"]) / abs(reference[s]["loss/ce"]) for s in steps]
    return {"mean": sum(diffs) / len(diffs), "max": max(diffs)}


def curves_agree(diff: dict[str, float]) -> bool:
    return diff["mean"] < CURVE_MEAN_RTOL and diff["max"] < CURVE_MAX_RTOL


def compare_stats(reference: dict[int, dict], other: dict[int, dict]) -> dict:
    """The reduced statistics of two runs over the same global batches: per-layer active fractions,
    overflow counts and energy (summed over ranks)."""
    steps = sorted(set(reference) & set(other))
    layer_keys = [k for k in reference[steps[0]] if k.startswith("sparsity/layer_") and k.endswith("/active_frac")]
    active = max((abs(other[s][k] - reference[s][k]) for s in steps for k in layer_keys), default=0.0)
    result = {"layers_compared": len(layer_keys), "max_active_frac_diff": active}
    if "kernel/overflow_rows" in reference[steps[0]]:
        ref_rows = sum(reference[s]["kernel/overflow_rows"] for s in steps)
        result["overflow_rows_ratio"] = sum(other[s]["kernel/overflow_rows"] for s in steps) / max(ref_rows, 1.0)
    last = steps[-1]
    if "energy/total_joules" in reference[last] and "energy/total_joules" in other[last]:
        result["energy_joules"] = [reference[last]["energy/total_joules"], other[last]["energy/total_joules"]]
        result["energy_ratio"] = other[last]["energy/total_joules"] / reference[last]["energy/total_joules"]
    return result


def curve(rows: dict[int, dict]) -> list[float]:
    return [round(rows[s]["loss/ce"], 5) for s in sorted(rows)]


def throughput(rows: dict[int, dict]) -> float:
    """Median tokens/s/GPU over the second half of the run (past start-up and compilation)."""
    values = sorted(r["perf/tokens_per_sec_per_gpu"] for s, r in rows.items() if s > max(rows) // 2)
    return values[len(values) // 2]


def check_parity(runner: Runner, variant: str, overrides: list[str], steps: int) -> dict:
    one, many = f"{variant}-1gpu", f"{variant}-{runner.gpus}gpu"
    runner.run(one, 1, overrides)
    runner.run(many, runner.gpus, overrides)
    reference, other = read_metrics(runner.root / one), read_metrics(runner.root / many)
    every = range(1, steps + 1)
    result = {
        "loss_rel_diff": loss_diff(reference, other, every),
        "first_last_loss": [reference[1]["loss/ce"], reference[steps]["loss/ce"], other[steps]["loss/ce"]],
        "tokens_per_s_per_gpu": [throughput(reference), throughput(other)],
        "curves": {one: curve(reference), many: curve(other)},
        **compare_stats(reference, other),
    }
    result["passed"] = curves_agree(result["loss_rel_diff"]) and result["max_active_frac_diff"] < ACTIVE_ATOL
    return result


def check_kill_and_resume(runner: Runner, overrides: list[str], straight: str, steps: int) -> dict:
    name = f"sparse-{runner.gpus}gpu-killed"
    proc = runner.start(name, runner.gpus, overrides)
    runner.wait_for_step(proc, name, CHECKPOINT_INTERVAL + 3)
    kill_tree(proc.pid)  # torchrun starts its workers in sessions of their own: kill every process
    proc.wait()
    before_kill = read_metrics(runner.root / name)
    killed_at = max(before_kill)
    runner.run(name, runner.gpus, overrides)
    resumed_from = resumed_step(runner.root / f"{name}.log")
    resumed = read_metrics(runner.root / name)
    replayed = range(CHECKPOINT_INTERVAL + 1, killed_at + 1)  # computed before the kill and again after the resume
    replay = loss_diff(before_kill, resumed, replayed)
    diff = loss_diff(read_metrics(runner.root / straight), resumed, range(1, steps + 1))
    return {"killed_after_step": killed_at, "resumed_from_step": resumed_from, "replayed_steps_loss_rel_diff": replay,
            "loss_rel_diff_vs_uninterrupted": diff, "curve": curve(resumed),
            "passed": curves_agree(diff) and replay["max"] < REPLAY_RTOL and resumed_from == CHECKPOINT_INTERVAL < killed_at}


def check_resume_onto_one(runner: Runner, overrides: list[str], straight: str, steps: int) -> dict:
    name = f"sparse-{runner.gpus}gpu-then-1gpu"
    stop_file = runner.root / f"{name}.stop"
    stop_file.unlink(missing_ok=True)
    proc = runner.start(name, runner.gpus, overrides, env={"SPARSE_LLM_STOP_FILE": str(stop_file)})
    runner.wait_for_step(proc, name, CHECKPOINT_INTERVAL + 5)
    stop_file.touch()
    if proc.wait() != 0:
        raise RuntimeError(f"{name} did not stop cleanly on its stop file (exit {proc.returncode})")
    stopped_at = last_step(runner.root / name)
    runner.run(name, 1, overrides)
    resumed_from = resumed_step(runner.root / f"{name}.log")
    diff = loss_diff(read_metrics(runner.root / straight), read_metrics(runner.root / name), range(1, steps + 1))
    return {"stopped_at_step": stopped_at, "resumed_from_step": resumed_from, "loss_rel_diff_vs_uninterrupted": diff,
            "curve": curve(read_metrics(runner.root / name)),
            "passed": curves_agree(diff) and resumed_from == stopped_at < steps}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=2, help="processes of the multi-GPU runs (one GPU each)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--model", default="125m")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--sparse-kernel", default="hybrid", help="kernel of the sparse runs (torch on CPU)")
    parser.add_argument("--l1", type=float, default=1e-4, help="sparsity.l1 of the sparse runs")
    parser.add_argument("--lr", type=float, default=3e-4,
                        help="peak learning rate; the ReLU models spike at 1e-3 after a 5-step warm-up (the PyTorch "
                             "path too), and a spike turns bf16 noise into different curves")
    parser.add_argument("--data", help="a prepared corpus (default: the default corpus, prepared on first use); "
                                       "its vocabulary sizes the model")
    parser.add_argument("--root", help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--json", help="also write the results to this file")
    args, extra = parser.parse_known_args(argv)
    if args.steps < CHECKPOINT_INTERVAL + 8:
        parser.error(f"--steps must be at least {CHECKPOINT_INTERVAL + 8} (a checkpoint, a kill and a stop in between)")
    if args.root and Path(args.root).is_dir() and any(Path(args.root).iterdir()):  # its runs would resume
        parser.error(f"--root {args.root} is not empty: give a new or empty folder (earlier runs would auto-resume)")
    defaults = compose_config([f"model={args.model}"])
    if args.data:
        vocab, data = load_manifest(Path(args.data)).vocab_size, ["data=shards", f"data.path={args.data}"]
    else:
        vocab = load_manifest(ensure_default_corpus(DEFAULT_ROOT, defaults.data.vocab_size)).vocab_size
        data = ["data=default"]
    seq_len = defaults.model.seq_len
    base = [f"model={args.model}", f"model.vocab_size={vocab}", *data, f"max_steps={args.steps}", "logging.interval=1", "eval_batches=0", "logging.wandb.mode=disabled",
            f"checkpoint.interval={CHECKPOINT_INTERVAL}", "checkpoint.signal_check_interval=1",
            f"optim.lr={args.lr}", "schedule.warmup_steps=10", *extra]
    variants = {"dense": ["sparsity=dense", "kernel=torch"],
                "sparse": ["sparsity=l1", f"sparsity.l1={args.l1}", f"kernel={args.sparse_kernel}"]}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.root or scratch)
        root.mkdir(parents=True, exist_ok=True)
        runner = Runner(root, args.device, args.micro_batch, seq_len, args.gpus, base)
        results = {"gpus": args.gpus, "model": args.model, "steps": args.steps, "base_overrides": runner.base}
        for variant, overrides in variants.items():
            results[f"parity_{variant}"] = check_parity(runner, variant, overrides, args.steps)
            print(f"parity {variant}: {summary(results[f'parity_{variant}'])}", flush=True)
        straight = f"sparse-{args.gpus}gpu"
        results["kill_and_resume"] = check_kill_and_resume(runner, variants["sparse"], straight, args.steps)
        print(f"kill and resume: {summary(results['kill_and_resume'])}", flush=True)
        results["resume_onto_one_gpu"] = check_resume_onto_one(runner, variants["sparse"], straight, args.steps)
        print(f"resume onto 1 GPU: {summary(results['resume_onto_one_gpu'])}", flush=True)
    results["passed"] = all(v["passed"] for v in results.values() if isinstance(v, dict))
    print(f"multi-GPU checks {'passed' if results['passed'] else 'FAILED'}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if results["passed"] else 1


def summary(result: dict) -> str:
    return json.dumps({k: v for k, v in result.items() if k not in ("curve", "curves")})


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
