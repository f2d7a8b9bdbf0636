"""Telemetry callbacks chosen from the config: energy (train/energy.py), memory, MFU against the
device's dense bf16 peak, wandb media (per-layer sparsity heat map, active-per-token histograms),
a torch.profiler window and a CUDA memory snapshot; and dead-neuron re-initialization
(sparsity/reinit.py), which is not telemetry but rides on the same hooks.

Every callback reads device values back to the host only on log steps (or, for re-initialization,
at the end of its window), and never adds a collective outside them.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

import torch

from sparse_llm.config import HardwareConfig, TrainConfig
from sparse_llm.parallel.distributed import World
from sparse_llm.train.energy import EnergyCallback
from sparse_llm.train.trainer import GIB, Callback

log = logging.getLogger("sparse_llm")


def build_callbacks(cfg: TrainConfig, world: World, run_dir: Path) -> list:
    from sparse_llm.sparsity.reinit import DeadNeuronReinit

    t = cfg.telemetry
    callbacks: list[Callback] = []
    if cfg.sparsity.reinit_dead:
        callbacks.append(DeadNeuronReinit.from_config(cfg))  # first: it changes weights right after the step
    if t.energy:
        callbacks.append(EnergyCallback())
    callbacks.append(PerfCallback(cfg.hardware, run_dir))
    if t.memory:
        callbacks.append(MemoryCallback())
    if t.media_interval > 0 and cfg.logging.wandb.mode != "disabled" and world.is_main:
        interval = -(-t.media_interval // cfg.logging.interval) * cfg.logging.interval  # media go on log steps
        callbacks.append(WandbMediaCallback(interval, cfg.model.n_layers, cfg.model.d_ff, run_dir))
    if t.profile_steps > 0:
        callbacks.append(ProfilerCallback(t.profile_start_step, t.profile_steps, run_dir, world.rank))
    if t.memory_snapshot_step > 0:
        callbacks.append(MemorySnapshotCallback(t.memory_snapshot_step, t.memory_snapshot_max_entries,
                                                run_dir, world.rank))
    return callbacks


# ---- MFU -------------------------------------------------------------------------------------------
def lookup_peak_tflops(device_name: str, hardware: HardwareConfig) -> tuple[Optional[float], Optional[str]]:
    """(dense bf16 peak TFLOP/s, the table key that matched) for a device name; (None, None) if unknown.

    `hardware.peak_tflops` wins when set; otherwise the longest key of `hardware.peak_bf16_tflops`
    that is a case-insensitive substring of the name (so "H100 PCIe" beats "H100").
    """
    if hardware.peak_tflops is not None:
        return float(hardware.peak_tflops), "hardware.peak_tflops"
    name = device_name.lower()
    matches = [key for key in hardware.peak_bf16_tflops if key.strip() and key.lower() in name]
    if not matches:
        return None, None
    key = max(matches, key=len)
    return float(hardware.peak_bf16_tflops[key]), key


class PerfCallback(Callback):
    """`perf/mfu_dense_equiv` = achieved dense-equivalent model TFLOP/s per GPU over the device's dense
    bf16 peak (a fraction); the device name goes to the console, RUN_DIR/hardware.json and wandb's config."""

    def __init__(self, hardware: HardwareConfig, run_dir: Optional[Path]):
        self.hardware, self.run_dir = hardware, run_dir
        self.peak: Optional[float] = None
        self.device_name = "cpu"
        self._announced = False

    def on_fit_start(self, trainer) -> None:
        device = trainer.device
        self.device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        self.peak, key = lookup_peak_tflops(self.device_name, self.hardware) if device.type == "cuda" else (None, None)
        if not trainer.world.is_main:
            return
        if self.peak is not None:
            log.info("device %s: dense bf16 peak %.0f TFLOP/s (%s)", self.device_name, self.peak,
                     key if key == "hardware.peak_tflops" else f"hardware.peak_bf16_tflops[{key!r}]")
        else:
            log.info("device %s: no dense bf16 peak known, perf/mfu_dense_equiv is not logged%s", self.device_name,
                     " (set hardware.peak_tflops=<TFLOP/s>)" if device.type == "cuda" else "")
        info = {"device_name": self.device_name, "peak_bf16_tflops": self.peak, "matched_key": key}
        if self.run_dir is not None and self.run_dir.is_dir():
            (self.run_dir / "hardware.json").write_text(json.dumps(info, indent=1) + "\n")
        for sink in getattr(trainer.logger, "sinks", []):
            run = getattr(sink, "run", None)
            if run is not None and hasattr(run, "config"):
                try:
                    run.config.update({"hardware": info}, allow_val_change=True)
                except Exception as error:  # media and config are best effort
                    log.debug("could not add the device to the wandb config: %s", error)

    def on_step_end(self, trainer, step: int, metrics: Optional[dict[str, float]]) -> None:
        if metrics is None or self.peak is None:
            return
        if not self._announced:
            metrics["perf/peak_tflops_per_gpu"] = self.peak
            self._announced = True
        if "perf/model_tflops_per_gpu" in metrics:
            metrics["perf/mfu_dense_equiv"] = metrics["perf/model_tflops_per_gpu"] / self.peak


# ---- memory ----------------------------------------------------------------------------------------
def memory_metrics(stats: dict[str, Any], total_bytes: int, max_allocated: int, max_reserved: int) -> dict[str, float]:
    """Peak memory as % of the device, and the caching allocator's retry and OOM counters (cumulative)."""
    out = {"mem/alloc_retries": float(stats.get("num_alloc_retries", 0)),
           "mem/ooms": float(stats.get("num_ooms", 0))}
    if total_bytes > 0:
        out["mem/max_allocated_pct"] = 100.0 * max_allocated / total_bytes
        out["mem/max_reserved_pct"] = 100.0 * max_reserved / total_bytes
        out["mem/device_total_gib"] = total_bytes / GIB
    return out


class MemoryCallback(Callback):
    """This rank's (rank 0's, in the logs) peak memory as % of the device, allocation retries and OOMs.
    CUDA only; on CPU nothing is logged (the trainer logs mem/max_*_gib on CUDA too)."""

    def on_step_end(self, trainer, step: int, metrics: Optional[dict[str, float]]) -> None:
        if metrics is None or trainer.device.type != "cuda":
            return
        device = trainer.device
        metrics.update(memory_metrics(torch.cuda.memory_stats(device),
                                      torch.cuda.get_device_properties(device).total_memory,
                                      torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)))


# ---- wandb media -----------------------------------------------------------------------------------
# a short viridis-like ramp: dark blue (low active fraction) -> green -> yellow (high)
_RAMP = torch.tensor([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=torch.float32)


def heatmap_pixels(values: torch.Tensor, low: float = 1e-4, high: float = 1.0, max_width: int = 1024):
    """An RGB uint8 image (numpy, [H, W, 3]) of a [layers, steps] matrix of active fractions on a log
    scale from `low` to `high`; layer 0 is the top row, time runs left to right."""
    layers, steps = values.shape
    if steps > max_width:  # keep the image small: subsample the steps evenly
        values = values[:, torch.linspace(0, steps - 1, max_width).round().long()]
        steps = max_width
    v = values.double().nan_to_num(low).clamp(low, high)
    t = ((v.log10() - torch.log10(torch.tensor(low))) / (torch.log10(torch.tensor(high / low)))).float()
    position = t * (len(_RAMP) - 1)
    lower = position.floor().long().clamp(0, len(_RAMP) - 2)
    frac = (position - lower).unsqueeze(-1)
    rgb = _RAMP[lower] * (1 - frac) + _RAMP[lower + 1] * frac
    cell_h, cell_w = max(1, 256 // layers), max(1, 512 // steps)
    rgb = rgb.repeat_interleave(cell_h, 0).repeat_interleave(cell_w, 1)
    return rgb.round().clamp(0, 255).to(torch.uint8).numpy()


def rebin_histogram(hist: torch.Tensor, max_bins: int = 64):
    """(counts, edges) numpy arrays for wandb.Histogram from a histogram over integers 0..len-1."""
    import numpy as np

    hist = hist.double().cpu()
    nonzero = hist.nonzero()
    top = int(nonzero.max()) + 1 if nonzero.numel() else 1
    bins = min(max_bins, top)
    edges = np.linspace(0, top, bins + 1)
    counts, _ = np.histogram(np.arange(top) + 0.5, bins=edges, weights=hist[:top].numpy())
    return counts, edges


class WandbMediaCallback(Callback):
    """Every `interval` steps (on rank 0, only with a wandb sink): a layer x step heat map of the active
    fraction (from the logged `sparsity/layer_{i}/active_frac` values of every log step so far) and one
    histogram per layer of active units per token over rank 0's tokens of that step. The histogram is
    accumulated on device during that one step only, so the cost between media steps is nil."""

    def __init__(self, interval: int, n_layers: int, d_ff: int, run_dir: Optional[Path]):
        self.interval, self.n_layers, self.d_ff, self.run_dir = interval, n_layers, d_ff, run_dir
        self.run = None
        self.steps: list[int] = []
        self.fractions: list[list[float]] = []
        self.hist: Optional[torch.Tensor] = None

    def on_fit_start(self, trainer) -> None:
        from sparse_llm.train.loggers import WandbSink

        sinks = [s for s in getattr(trainer.logger, "sinks", []) if isinstance(s, WandbSink)]
        self.run = sinks[0].run if sinks and trainer.world.is_main else None
        if self.run is not None and self.run_dir is not None:
            self._load_history(self.run_dir / "metrics.jsonl", trainer.step)

    def _load_history(self, path: Path, up_to_step: int) -> None:
        """A resumed run continues its heat map from the JSONL it already wrote."""
        if not path.is_file():
            return
        by_step: dict[int, list[float]] = {}
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            row = _layer_fractions(record, self.n_layers)
            if row is not None and record.get("step", up_to_step + 1) <= up_to_step:
                by_step[int(record["step"])] = row
        self.steps = sorted(by_step)
        self.fractions = [by_step[s] for s in self.steps]

    def _media_step(self, step: int) -> bool:
        return self.run is not None and step % self.interval == 0

    def on_micro_batch_end(self, trainer, output) -> None:
        if not self._media_step(trainer.step + 1):  # trainer.step counts finished steps
            return
        stats = output.ffn_stats
        if not stats or any(s is None for s in stats):
            return
        if self.hist is None:
            self.hist = torch.zeros(self.n_layers, self.d_ff + 1, dtype=torch.float64, device=trainer.device)
        for i, layer in enumerate(stats):
            per_token = layer.tile_counts.sum(1, dtype=torch.int64)
            self.hist[i].index_add_(0, per_token, torch.ones_like(per_token, dtype=torch.float64))

    def on_step_end(self, trainer, step: int, metrics: Optional[dict[str, float]]) -> None:
        if metrics is None or self.run is None:
            return
        row = _layer_fractions(metrics, self.n_layers)
        if row is not None:
            self.steps.append(step)
            self.fractions.append(row)
        if not self._media_step(step):
            return
        try:
            media = self._media(step)
            if media:
                self.run.log(media, step=step)
        except Exception as error:  # media are best effort (e.g. Pillow missing): disable, keep training
            log.warning("wandb media disabled: %s: %s", type(error).__name__, error)
            self.run = None
        self.hist = None

    def _media(self, step: int) -> dict[str, Any]:
        import wandb

        media: dict[str, Any] = {}
        if self.fractions:
            values = torch.tensor(self.fractions, dtype=torch.float64).T  # [layers, log steps]
            media["media/active_frac_heatmap"] = wandb.Image(
                heatmap_pixels(values),
                caption=f"active fraction, layer (rows, 0 on top) x log step (steps {self.steps[0]}-{self.steps[-1]}); "
                        f"log colour scale 1e-4 (dark) to 1 (yellow)")
        if self.hist is not None:
            hist = self.hist.cpu()
            for i in range(self.n_layers):
                counts, edges = rebin_histogram(hist[i])
                media[f"media/active_per_token_hist/layer_{i}"] = wandb.Histogram(np_histogram=(counts, edges))
        return media


def _layer_fractions(metrics: dict[str, Any], n_layers: int) -> Optional[list[float]]:
    keys = [f"sparsity/layer_{i}/active_frac" for i in range(n_layers)]
    if not all(isinstance(metrics.get(k), (int, float)) for k in keys):
        return None
    return [float(metrics[k]) for k in keys]


# ---- profiler and memory snapshot ------------------------------------------------------------------
class ProfilerCallback(Callback):
    """torch.profiler over steps [start, start + steps - 1] (1-based step numbers, as logged). Writes
    RUN_DIR/profile/trace_rank{r}_steps{a}-{b}.json (chrome://tracing, Perfetto) and a key_averages
    table beside it."""

    def __init__(self, start_step: int, steps: int, run_dir: Path, rank: int = 0):
        self.start, self.steps, self.run_dir, self.rank = start_step, steps, run_dir, rank
        self.profiler = None
        self.done = False

    @property
    def last(self) -> int:
        return self.start + self.steps - 1

    def on_fit_start(self, trainer) -> None:
        self._maybe_start(trainer, trainer.step + 1)

    def _maybe_start(self, trainer, next_step: int) -> None:
        if self.done or self.profiler is not None or next_step != self.start:
            return
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if trainer.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        self.profiler = profile(activities=activities, record_shapes=True)
        self.profiler.__enter__()
        self._cuda = trainer.device.type == "cuda"

    def on_step_end(self, trainer, step: int, metrics: Optional[dict[str, float]]) -> None:
        if self.profiler is not None and step >= self.last:
            self._stop(step)
        self._maybe_start(trainer, step + 1)

    def on_fit_end(self, trainer) -> None:
        if self.profiler is not None:
            self._stop(trainer.step)

    def _stop(self, step: int) -> None:
        profiler, self.profiler, self.done = self.profiler, None, True
        if self._cuda:
            torch.cuda.synchronize()
        profiler.__exit__(None, None, None)
        out = self.run_dir / "profile"
        out.mkdir(parents=True, exist_ok=True)
        stem = f"rank{self.rank}_steps{self.start}-{step}"
        profiler.export_chrome_trace(str(out / f"trace_{stem}.json"))
        sort_by = "self_cuda_time_total" if self._cuda else "self_cpu_time_total"
        try:
            table = profiler.key_averages().table(sort_by=sort_by, row_limit=50)
        except Exception:  # the sort key's name differs between torch versions
            table = profiler.key_averages().table(row_limit=50)
        (out / f"ops_{stem}.txt").write_text(table + "\n")
        log.info("profiler: steps %d-%d written to %s", self.start, step, out)


class MemorySnapshotCallback(Callback):
    """Records CUDA allocator history from the start of fit and dumps a snapshot after step `step` to
    RUN_DIR/profile/memory_snapshot_rank{r}_step{s}.pickle (open it at https://pytorch.org/memory_viz).
    A no-op on CPU."""

    def __init__(self, step: int, max_entries: int, run_dir: Path, rank: int = 0):
        self.step, self.max_entries, self.run_dir, self.rank = step, max_entries, run_dir, rank
        self.recording = False

    def on_fit_start(self, trainer) -> None:
        if trainer.device.type != "cuda":
            if trainer.world.is_main:
                log.info("telemetry.memory_snapshot_step is set but the device is %s: no CUDA memory snapshot",
                         trainer.device)
            return
        if trainer.step < self.step:
            torch.cuda.memory._record_memory_history(max_entries=self.max_entries)
            self.recording = True

    def on_step_end(self, trainer, step: int, metrics: Optional[dict[str, float]]) -> None:
        if not self.recording or step != self.step:
            return
        out = self.run_dir / "profile"
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"memory_snapshot_rank{self.rank}_step{step}.pickle"
        torch.cuda.memory._dump_snapshot(str(path))
        self._stop()
        log.info("CUDA memory snapshot written to %s", path)

    def on_fit_end(self, trainer) -> None:
        self._stop()

    def _stop(self) -> None:
        if self.recording:
            torch.cuda.memory._record_memory_history(enabled=None)
            self.recording = False
