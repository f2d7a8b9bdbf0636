"""GPU energy from NVML's cumulative total-energy counter (not power polling).

`nvmlDeviceGetTotalEnergyConsumption` returns the millijoules a GPU has used since the driver was
loaded, as an unsigned 64-bit counter. `EnergyMeter` turns successive readings into deltas (modulo
the counter's range, so a wrap-around is a small positive delta, never a negative or huge one);
`EnergyCallback` splits each rank's energy into training and evaluation, sums it over ranks with one
all-reduce at log time, and reports

    energy/joules            training energy of all GPUs over this log interval (J)
    energy/joules_per_token  energy/joules / global training tokens of the interval
    energy/avg_power_w       mean power per GPU while training in the interval (W)
    energy/total_joules      training energy of all GPUs since the run started (kept across resumes)
    energy/eval_joules, energy/eval_joules_per_token, energy/eval_avg_power_w   the same for evaluation

When NVML, the counter or a GPU is missing on any rank, none of these is logged: the first log step
carries `energy/available: 0` (and a console note), never a zero energy. With the counter present,
the first log step carries `energy/available: 1`.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from sparse_llm.train.trainer import Callback

log = logging.getLogger("sparse_llm")

COUNTER_MODULUS = 2**64  # nvmlDeviceGetTotalEnergyConsumption is an unsigned long long
EnergyReader = Callable[[], int]  # returns the cumulative counter in millijoules


class EnergyUnavailable(RuntimeError):
    pass


def nvml_energy_reader(device: torch.device) -> EnergyReader:
    """A reader of the NVML energy counter of the GPU behind `device`; raises EnergyUnavailable with the
    reason when there is no GPU, no NVML, or the device has no energy counter (pre-Volta, some vGPUs)."""
    if device.type != "cuda":
        raise EnergyUnavailable(f"device {device} is not a CUDA GPU")
    try:
        import pynvml
    except ImportError as error:
        raise EnergyUnavailable(f"nvidia-ml-py is not installed ({error})") from error
    try:
        pynvml.nvmlInit()
        handle = _nvml_handle(pynvml, device)
        pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)  # probe: NotSupported raises here
    except pynvml.NVMLError as error:
        raise EnergyUnavailable(f"NVML: {error}") from error
    return lambda: int(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle))


def _nvml_handle(pynvml, device: torch.device):
    """NVML numbers GPUs physically, CUDA after CUDA_VISIBLE_DEVICES: match by UUID, then PCI bus id."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    uuid = getattr(props, "uuid", None)
    if uuid is not None:
        for candidate in (f"GPU-{uuid}", str(uuid)):
            try:
                return pynvml.nvmlDeviceGetHandleByUUID(candidate)
            except pynvml.NVMLError:
                pass
    bus = getattr(props, "pci_bus_id", None)
    if bus is not None:
        domain = getattr(props, "pci_domain_id", 0)
        slot = getattr(props, "pci_device_id", 0)
        try:
            return pynvml.nvmlDeviceGetHandleByPciBusId(f"{domain:08x}:{bus:02x}:{slot:02x}.0")
        except pynvml.NVMLError:
            pass
    return pynvml.nvmlDeviceGetHandleByIndex(index)


class EnergyMeter:
    """Deltas of a cumulative, wrapping counter: each `delta_mj()` is the energy since the previous call."""

    def __init__(self, read_mj: EnergyReader, modulus: int = COUNTER_MODULUS):
        self.read_mj, self.modulus = read_mj, modulus
        self.last = int(read_mj())

    def delta_mj(self) -> int:
        now = int(self.read_mj())
        delta = (now - self.last) % self.modulus
        self.last = now
        return delta


def reduce_energy(values: list[float], device: torch.device) -> list[float]:
    """Sum per-rank values over all ranks (one all-reduce; a no-op in one process)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


class EnergyCallback(Callback):
    """Training and evaluation energy per log interval, summed over ranks.

    `reader_factory(device)` returns this rank's EnergyReader or raises EnergyUnavailable; tests
    inject a fake counter through it (and a fake `clock`). Reads happen at fit start, eval start/end and log steps only.
    """

    def __init__(self, reader_factory: Callable[[torch.device], EnergyReader] = nvml_energy_reader,
                 modulus: int = COUNTER_MODULUS, clock: Callable[[], float] = time.perf_counter):
        self.reader_factory, self.modulus, self.clock = reader_factory, modulus, clock
        self.meter: Optional[EnergyMeter] = None
        self.unavailable_reason: Optional[str] = None
        self.reported_availability = False
        self.total_joules = 0.0
        self.total_eval_joules = 0.0
        self._reset_interval()
        self._eval_started: Optional[float] = None
        self._last_log_step = 0
        self.device = torch.device("cpu")

    def _reset_interval(self) -> None:
        self.train_mj = self.eval_mj = 0
        self.train_s = self.eval_s = 0.0
        self.eval_tokens = 0
        self._mark = self.clock()

    # ---- hooks -------------------------------------------------------------------------------
    def on_fit_start(self, trainer) -> None:
        self.device = trainer.device
        try:
            self.meter = EnergyMeter(self.reader_factory(trainer.device), self.modulus)
        except EnergyUnavailable as error:
            self.meter, self.unavailable_reason = None, str(error)
        except Exception as error:  # an unexpected NVML failure must not stop training
            self.meter, self.unavailable_reason = None, f"{type(error).__name__}: {error}"
        self._reset_interval()
        self._eval_started = None
        self._last_log_step = trainer.step

    def _lap(self) -> tuple[int, float]:
        now = self.clock()
        seconds, self._mark = now - self._mark, now
        return (self.meter.delta_mj() if self.meter is not None else 0), seconds

    def on_eval_start(self, trainer) -> None:
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)  # training work still queued belongs to training
        mj, seconds = self._lap()
        self.train_mj += mj
        self.train_s += seconds
        self._eval_started = self._mark

    def on_eval_end(self, trainer, metrics: dict[str, float]) -> None:
        if self._eval_started is None:
            return
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
        mj, seconds = self._lap()
        self.eval_mj += mj
        self.eval_s += seconds
        self.eval_tokens += _eval_tokens_per_rank(trainer)
        self._eval_started = None

    def on_step_end(self, trainer, step: int, metrics: Optional[dict[str, float]]) -> None:
        if metrics is None:
            return
        mj, seconds = self._lap()
        self.train_mj += mj
        self.train_s += seconds
        # one all-reduce: [available ranks, train mJ, eval mJ]; ranks run in lockstep, so wall times are local
        available, train_mj, eval_mj = reduce_energy(
            [1.0 if self.meter is not None else 0.0, float(self.train_mj), float(self.eval_mj)], self.device)
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        # train tokens of the interval: steps since the last log x global tokens per step
        train_tokens = trainer.cfg.tokens_per_step * max(step - self._last_log_step, 1)
        eval_tokens = self.eval_tokens * world
        train_s, eval_s = self.train_s, self.eval_s
        self._reset_interval()
        self._last_log_step = step
        if available < world:
            if not self.reported_availability:
                metrics["energy/available"] = 0.0
                if trainer.world.is_main:
                    reason = self.unavailable_reason or "NVML energy counter missing on another rank"
                    log.info("energy telemetry unavailable (%s): energy/* is not logged", reason)
                self.reported_availability = True
            return
        if not self.reported_availability:
            metrics["energy/available"] = 1.0
            self.reported_availability = True
        metrics.update(energy_metrics(train_mj, train_tokens, train_s, world))
        self.total_joules += train_mj / 1e3
        metrics["energy/total_joules"] = self.total_joules
        if eval_mj > 0 or eval_s > 0:
            metrics.update(energy_metrics(eval_mj, eval_tokens, eval_s, world, prefix="energy/eval_"))
            self.total_eval_joules += eval_mj / 1e3

    def state_dict(self) -> dict[str, Any]:
        # identical on all ranks (totals are sums after the all-reduce)
        return {"total_joules": self.total_joules, "total_eval_joules": self.total_eval_joules}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total_joules = float(state.get("total_joules", 0.0))
        self.total_eval_joules = float(state.get("total_eval_joules", 0.0))


def _eval_tokens_per_rank(trainer) -> int:
    """Tokens one rank evaluates in `Trainer.evaluate` (the loader may hold fewer than eval_batches)."""
    cfg, loader = trainer.cfg, trainer.val_loader
    batches = cfg.eval_batches
    windows, global_batch = getattr(loader, "num_windows", None), getattr(loader, "global_batch", None)
    if isinstance(windows, int) and isinstance(global_batch, int) and global_batch > 0:
        batches = min(batches, windows // global_batch)
    return batches * cfg.micro_batch_size * cfg.model.seq_len


def energy_metrics(millijoules: float, tokens: float, seconds: float, gpus: int,
                   prefix: str = "energy/") -> dict[str, float]:
    """Joules, joules per token and mean power per GPU of one interval (energy summed over GPUs)."""
    joules = millijoules / 1e3
    out = {f"{prefix}joules": joules}
    if tokens > 0:
        out[f"{prefix}joules_per_token"] = joules / tokens
    if seconds > 0:
        out[f"{prefix}avg_power_w"] = joules / seconds / gpus
    return out
