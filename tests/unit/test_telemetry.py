"""Telemetry callbacks: energy from a fake NVML counter (wrap-around, train/eval split, unavailable),
MFU peak lookup, memory metrics, wandb media, profiler, and the callbacks the config builds."""
import json
from types import SimpleNamespace

import pytest
import torch

from sparse_llm.config import HardwareConfig
from sparse_llm.kernels.reference import activation_stats
from sparse_llm.model import FFNStats
from sparse_llm.sparsity.reinit import DeadNeuronReinit
from sparse_llm.train.energy import (COUNTER_MODULUS, EnergyCallback, EnergyMeter, EnergyUnavailable, energy_metrics,
                                     nvml_energy_reader)
from sparse_llm.train.loggers import WandbSink
from sparse_llm.train.telemetry import (MemoryCallback, MemorySnapshotCallback, PerfCallback, ProfilerCallback,
                                        WandbMediaCallback, build_callbacks, heatmap_pixels, lookup_peak_tflops,
                                        memory_metrics, rebin_histogram)
from tests.helpers import compose_config


class FakeCounter:
    """A settable NVML total-energy counter (millijoules)."""

    def __init__(self, start: int):
        self.value = start

    def __call__(self) -> int:
        return self.value


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def fake_trainer(step=0, device="cpu", tokens_per_step=1000, eval_batches=2, micro_batch_size=4, seq_len=10,
                 sinks=(), model=None, is_main=True):
    cfg = SimpleNamespace(tokens_per_step=tokens_per_step, eval_batches=eval_batches,
                          micro_batch_size=micro_batch_size, model=SimpleNamespace(seq_len=seq_len))
    return SimpleNamespace(cfg=cfg, step=step, device=torch.device(device), world=SimpleNamespace(is_main=is_main),
                           logger=SimpleNamespace(sinks=list(sinks)), val_loader=None, model=model)


# ---- energy ----------------------------------------------------------------------------------------
def test_energy_meter_deltas_and_wraparound():
    counter = FakeCounter(COUNTER_MODULUS - 300)
    meter = EnergyMeter(counter)
    counter.value = COUNTER_MODULUS - 100
    assert meter.delta_mj() == 200
    counter.value = 50  # the 64-bit counter wrapped: 100 to the top, then 50
    assert meter.delta_mj() == 150
    assert meter.delta_mj() == 0
    small = FakeCounter(990)
    meter = EnergyMeter(small, modulus=1000)
    small.value = 15
    assert meter.delta_mj() == 25


def test_energy_metrics_hand_computed():
    out = energy_metrics(millijoules=6000, tokens=3000, seconds=2.0, gpus=2)
    assert out == {"energy/joules": 6.0, "energy/joules_per_token": 0.002, "energy/avg_power_w": 1.5}
    assert set(energy_metrics(10, 0, 0, 1, prefix="energy/eval_")) == {"energy/eval_joules"}


def test_energy_callback_train_and_eval_split():
    clock, counter = FakeClock(), FakeCounter(COUNTER_MODULUS - 2000)  # wraps during the run
    callback = EnergyCallback(reader_factory=lambda device: counter, clock=clock)
    trainer = fake_trainer(tokens_per_step=1000)
    callback.on_fit_start(trainer)
    # steps 1 and 2: 5 J in 2 s, logged at step 2
    clock.now += 1.0; counter.value += 2500 - COUNTER_MODULUS  # noqa: E702  (wraps here)
    callback.on_step_end(trainer, 1, None)
    clock.now += 1.0; counter.value += 2500  # noqa: E702
    metrics = {}
    callback.on_step_end(trainer, 2, metrics)
    assert metrics["energy/available"] == 1.0
    assert metrics["energy/joules"] == pytest.approx(5.0)
    assert metrics["energy/joules_per_token"] == pytest.approx(5.0 / 2000)
    assert metrics["energy/avg_power_w"] == pytest.approx(2.5)
    assert metrics["energy/total_joules"] == pytest.approx(5.0)
    assert not any(k.startswith("energy/eval_") for k in metrics)
    # step 3 trains (1 J, 1 s), then evaluation (3 J, 0.5 s) inside the log step 4, then 1 J more
    clock.now += 1.0; counter.value += 1000  # noqa: E702
    callback.on_step_end(trainer, 3, None)
    clock.now += 1.0; counter.value += 1000  # noqa: E702
    callback.on_eval_start(trainer)
    clock.now += 0.5; counter.value += 3000  # noqa: E702
    callback.on_eval_end(trainer, {"val/ce": 1.0})
    clock.now += 0.5; counter.value += 1000  # noqa: E702
    metrics = {}
    callback.on_step_end(trainer, 4, metrics)
    assert "energy/available" not in metrics  # reported once
    assert metrics["energy/joules"] == pytest.approx(3.0)  # 1 + 1 + 1, eval excluded
    assert metrics["energy/joules_per_token"] == pytest.approx(3.0 / 2000)
    assert metrics["energy/avg_power_w"] == pytest.approx(3.0 / 2.5)
    assert metrics["energy/eval_joules"] == pytest.approx(3.0)
    assert metrics["energy/eval_joules_per_token"] == pytest.approx(3.0 / (2 * 4 * 10))
    assert metrics["energy/eval_avg_power_w"] == pytest.approx(6.0)
    assert metrics["energy/total_joules"] == pytest.approx(8.0)
    assert callback.state_dict() == {"total_joules": pytest.approx(8.0), "total_eval_joules": pytest.approx(3.0)}


def test_energy_unavailable_is_reported_once_never_as_zero(caplog):
    def no_nvml(device):
        raise EnergyUnavailable("no NVML here")

    callback = EnergyCallback(reader_factory=no_nvml)
    trainer = fake_trainer()
    callback.on_fit_start(trainer)
    logged = []
    with caplog.at_level("INFO", logger="sparse_llm"):
        for step in (1, 2, 3):
            metrics = {"loss/ce": 1.0}
            callback.on_eval_start(trainer)
            callback.on_eval_end(trainer, {})
            callback.on_step_end(trainer, step, metrics)
            logged.append(metrics)
    assert logged[0] == {"loss/ce": 1.0, "energy/available": 0.0}
    assert logged[1] == logged[2] == {"loss/ce": 1.0}
    assert "energy telemetry unavailable (no NVML here)" in caplog.text


def test_nvml_reader_without_gpu_or_nvml_is_unavailable():
    with pytest.raises(EnergyUnavailable, match="not a CUDA GPU"):
        nvml_energy_reader(torch.device("cpu"))
    try:
        reader = nvml_energy_reader(torch.device("cuda", 0))
    except EnergyUnavailable as error:
        assert "NVML" in str(error) or "nvidia-ml-py" in str(error) or "CUDA" in str(error)
    else:  # a machine with a GPU and NVML: the counter reads
        assert reader() >= 0


def test_energy_reader_crash_does_not_stop_training():
    def broken(device):
        raise OSError("driver went away")

    callback = EnergyCallback(reader_factory=broken)
    callback.on_fit_start(fake_trainer())
    metrics = {}
    callback.on_step_end(fake_trainer(), 1, metrics)
    assert metrics == {"energy/available": 0.0}


# ---- MFU, memory ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name,peak,key", [
    ("NVIDIA H100 80GB HBM3", 989, "H100"), ("NVIDIA H100 PCIe", 756, "H100 PCIe"), ("NVIDIA H100 NVL", 835, "H100 NVL"),
    ("NVIDIA H200", 989, "H200"), ("NVIDIA GH200 480GB", 989, "GH200"), ("NVIDIA A100-SXM4-80GB", 312, "A100"),
    ("NVIDIA A100 80GB PCIe", 312, "A100"), ("NVIDIA L40S", 362, "L40S"), ("NVIDIA L4", 121, "L4"),
    ("Tesla T4", None, None), ("cpu", None, None),
])
def test_peak_lookup_from_the_hardware_table(name, peak, key):
    hardware = compose_config().hardware
    assert lookup_peak_tflops(name, hardware) == ((None if peak is None else float(peak)), key)


def test_peak_override_wins():
    hardware = HardwareConfig(peak_tflops=500.0, peak_bf16_tflops={"H100": 989.0})
    assert lookup_peak_tflops("NVIDIA H100 80GB HBM3", hardware) == (500.0, "hardware.peak_tflops")


def test_mfu_from_model_tflops(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    callback = PerfCallback(compose_config().hardware, tmp_path)
    callback.on_fit_start(fake_trainer(device="cuda"))
    metrics = {"perf/model_tflops_per_gpu": 494.5}
    callback.on_step_end(None, 10, metrics)
    assert metrics["perf/mfu_dense_equiv"] == pytest.approx(0.5) and metrics["perf/peak_tflops_per_gpu"] == 989.0
    assert json.loads((tmp_path / "hardware.json").read_text())["device_name"] == "NVIDIA H100 80GB HBM3"
    metrics = {"perf/model_tflops_per_gpu": 98.9}
    callback.on_step_end(None, 20, metrics)
    assert metrics == {"perf/model_tflops_per_gpu": 98.9, "perf/mfu_dense_equiv": pytest.approx(0.1)}


def test_no_mfu_on_cpu(tmp_path):
    callback = PerfCallback(compose_config().hardware, tmp_path)
    callback.on_fit_start(fake_trainer())
    metrics = {"perf/model_tflops_per_gpu": 1.0}
    callback.on_step_end(None, 10, metrics)
    assert metrics == {"perf/model_tflops_per_gpu": 1.0}


def test_memory_metrics_hand_computed():
    gib = 2**30
    out = memory_metrics({"num_alloc_retries": 3, "num_ooms": 1}, total_bytes=80 * gib,
                         max_allocated=20 * gib, max_reserved=40 * gib)
    assert out == {"mem/alloc_retries": 3.0, "mem/ooms": 1.0, "mem/max_allocated_pct": 25.0,
                   "mem/max_reserved_pct": 50.0, "mem/device_total_gib": 80.0}
    metrics = {}
    MemoryCallback().on_step_end(fake_trainer(), 10, metrics)  # CPU: nothing
    assert metrics == {}


# ---- wandb media ---------------------------------------------------------------------------------
def test_heatmap_pixels_and_histogram_rebinning():
    values = torch.tensor([[1e-4, 1.0], [1e-2, 1e-6]])
    image = heatmap_pixels(values)
    assert image.dtype.name == "uint8" and image.shape == (2 * 128, 2 * 256, 3)
    assert image[0, 0].tolist() == [68, 1, 84] and image[0, -1].tolist() == [253, 231, 37]
    assert image[-1, -1].tolist() == [68, 1, 84]  # below the scale clamps to its bottom
    assert image[-1, 0].tolist() == [33, 145, 140]  # 1e-2 is the middle of the log scale
    hist = torch.zeros(301)
    hist[[0, 5, 200]] = torch.tensor([7.0, 2.0, 1.0])
    counts, edges = rebin_histogram(hist, max_bins=10)
    assert counts.sum() == 10 and len(counts) == 10 and edges[0] == 0 and edges[-1] == 201
    assert counts[0] == 9 and counts[-1] == 1


class FakeRun:
    def __init__(self):
        self.logged = []
        self.config = SimpleNamespace(update=lambda *a, **k: None)

    def log(self, data, step):
        self.logged.append((step, data))


def fake_wandb_sink():
    sink = object.__new__(WandbSink)
    sink.run = FakeRun()
    return sink


def layer_metrics(fractions):
    return {f"sparsity/layer_{i}/active_frac": f for i, f in enumerate(fractions)}


def test_wandb_media_at_the_interval_only(tmp_path):
    pytest.importorskip("PIL")
    sink = fake_wandb_sink()
    callback = WandbMediaCallback(interval=4, n_layers=2, d_ff=300, run_dir=tmp_path)
    trainer = fake_trainer(sinks=[sink])
    callback.on_fit_start(trainer)
    h = torch.zeros(3, 300)
    h[0, :5] = 1.0
    h[1, :2] = 1.0
    output = SimpleNamespace(ffn_stats=[FFNStats(*activation_stats(h)), FFNStats(*activation_stats(h[:, :0].new_zeros(3, 300)))])
    for step in range(1, 9):
        trainer.step = step - 1
        callback.on_micro_batch_end(trainer, output)
        if step != 4 and step != 8:
            assert callback.hist is None  # nothing accumulates outside the step before a media step
        metrics = layer_metrics([0.1 / step, 0.01]) if step % 2 == 0 else None
        callback.on_step_end(trainer, step, metrics)
    assert [step for step, _ in sink.run.logged] == [4, 8]
    step, media = sink.run.logged[-1]
    assert set(media) == {"media/active_frac_heatmap", "media/active_per_token_hist/layer_0",
                          "media/active_per_token_hist/layer_1"}
    assert callback.steps == [2, 4, 6, 8]
    hist = media["media/active_per_token_hist/layer_0"]
    assert sum(hist.histogram) == 3  # three tokens: 5, 2 and 0 active


def test_wandb_media_off_without_a_wandb_sink(tmp_path):
    callback = WandbMediaCallback(interval=2, n_layers=1, d_ff=8, run_dir=tmp_path)
    callback.on_fit_start(fake_trainer())
    callback.on_step_end(fake_trainer(), 2, layer_metrics([0.5]))
    assert callback.run is None and callback.steps == []


def test_wandb_media_history_resumes_from_jsonl(tmp_path):
    lines = [{"step": s, **layer_metrics([0.5, 0.25])} for s in (2, 4, 6)] + [{"step": 4, "val/ce": 3.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    callback = WandbMediaCallback(interval=2, n_layers=2, d_ff=8, run_dir=tmp_path)
    callback.on_fit_start(fake_trainer(step=4, sinks=[fake_wandb_sink()]))
    assert callback.steps == [2, 4] and callback.fractions == [[0.5, 0.25], [0.5, 0.25]]


# ---- profiler and memory snapshot ----------------------------------------------------------------
def test_profiler_window_writes_a_trace(tmp_path):
    callback = ProfilerCallback(start_step=2, steps=2, run_dir=tmp_path)
    trainer = fake_trainer()
    callback.on_fit_start(trainer)
    for step in range(1, 6):
        assert (callback.profiler is not None) == (step in (2, 3))
        torch.randn(16, 16) @ torch.randn(16, 16)
        trainer.step = step
        callback.on_step_end(trainer, step, None)
    callback.on_fit_end(trainer)
    files = sorted(p.name for p in (tmp_path / "profile").iterdir())
    assert files == ["ops_rank0_steps2-3.txt", "trace_rank0_steps2-3.json"]
    assert "aten::" in (tmp_path / "profile" / "ops_rank0_steps2-3.txt").read_text()


def test_profiler_cut_short_by_the_end_of_training(tmp_path):
    callback = ProfilerCallback(start_step=1, steps=10, run_dir=tmp_path, rank=1)
    trainer = fake_trainer()
    callback.on_fit_start(trainer)
    callback.on_step_end(trainer, 1, None)
    trainer.step = 2
    callback.on_fit_end(trainer)
    assert (tmp_path / "profile" / "trace_rank1_steps1-2.json").is_file()


def test_memory_snapshot_is_a_noop_on_cpu(tmp_path):
    callback = MemorySnapshotCallback(step=1, max_entries=10, run_dir=tmp_path)
    trainer = fake_trainer()
    callback.on_fit_start(trainer)
    callback.on_step_end(trainer, 1, None)
    callback.on_fit_end(trainer)
    assert not (tmp_path / "profile").exists()


# ---- what the config builds ------------------------------------------------------------------------
def test_build_callbacks_from_config(tmp_path):
    world = SimpleNamespace(rank=0, is_main=True)
    default = [type(c) for c in build_callbacks(compose_config(), world, tmp_path)]
    assert default == [EnergyCallback, PerfCallback, MemoryCallback, WandbMediaCallback]
    cfg = compose_config(["sparsity.reinit_dead=true", "telemetry.energy=false", "telemetry.memory=false",
                          "logging.wandb.mode=disabled", "telemetry.profile_steps=3", "telemetry.memory_snapshot_step=5"])
    built = [type(c) for c in build_callbacks(cfg, world, tmp_path)]
    assert built == [DeadNeuronReinit, PerfCallback, ProfilerCallback, MemorySnapshotCallback]
    off = compose_config(["telemetry.media_interval=0"])
    assert WandbMediaCallback not in [type(c) for c in build_callbacks(off, world, tmp_path)]
    odd = build_callbacks(compose_config(["telemetry.media_interval=15", "logging.interval=10"]), world, tmp_path)
    assert [c.interval for c in odd if isinstance(c, WandbMediaCallback)] == [20]  # rounded up to a log step


@pytest.mark.parametrize("overrides,match", [
    (["telemetry.profile_steps=-1"], "telemetry.profile_steps must be >= 0"),
    (["telemetry.profile_start_step=0"], "telemetry.profile_start_step"),
    (["telemetry.media_interval=-1"], "telemetry.media_interval must be >= 0"),
    (["telemetry.memory_snapshot_step=-2"], "telemetry.memory_snapshot_step"),
    (["hardware.peak_tflops=0"], "hardware.peak_tflops"),
    (["+hardware.peak_bf16_tflops.X1=-3"], "hardware.peak_bf16_tflops"),
    (["sparsity=dense", "sparsity.reinit_dead=true"], "sparsity.reinit_dead"),
    (["sparsity.reinit_window_tokens=0"], "sparsity.reinit_window_tokens"),
])
def test_bad_telemetry_values_name_the_key(overrides, match):
    from sparse_llm.config import ConfigError, validate

    with pytest.raises(ConfigError, match=match):
        validate(compose_config(overrides))
