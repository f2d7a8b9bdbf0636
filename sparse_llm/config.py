"""Typed configuration: one dataclass per Hydra config group, composed into `TrainConfig`.

The dataclasses are registered in Hydra's ConfigStore as schemas, so a YAML file or command-line
override with an unknown key or a value of the wrong type fails at composition. `validate()` then
checks what types cannot: divisibility, ranges and choices, with errors that name the key and the fix.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from hydra.core.config_store import ConfigStore

FFN_KINDS = ("swiglu", "relu_gated", "relu")
KERNELS = ("torch", "twell", "hybrid", "auto")
SCHEDULES = ("cosine", "wsd", "constant")
PRECISIONS = ("auto", "bf16", "fp32")
AC_MODES = ("none", "full", "selective")
GRAD_SYNC_MODES = ("auto", "every", "last")
WANDB_MODES = ("offline", "online", "disabled")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key and the fix."""


@dataclass
class ModelConfig:
    name: str = "tiny"
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 512
    vocab_size: int = 4096
    seq_len: int = 256
    rope_theta: float = 1e5
    norm_eps: float = 1e-5
    init_std: float = 0.02


@dataclass
class SparsityConfig:
    name: str = "l1"
    ffn: str = "relu_gated"
    l1: float = 2e-5
    l1_warmup_steps: int = 0
    # dead-neuron re-initialization (paper appendix C.3): after an optimizer step that closes a window of
    # `reinit_window_tokens` global tokens, gate rows (up rows for `relu`) of units that fired on no token in
    # the window become 0.9 W + 0.1 N(0, 0.02^2)
    reinit_dead: bool = False
    reinit_window_tokens: int = 10485760


@dataclass
class KernelConfig:
    name: str = "torch"


@dataclass
class DataConfig:
    name: str = "default"
    # default: the corpus the project prepares itself, cached under `root`.
    # shards: a directory prepared by `python data/prepare.py` (holding manifest.json).
    # synthetic: random tokens, for throughput benchmarks.
    root: str = "data/cache/default"
    path: Optional[str] = None
    vocab_size: int = 4096
    num_workers: int = 0


@dataclass
class OptimConfig:
    lr: float = 1e-3
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # a non-finite loss or gradient norm: `stop` (found at the next log step, no per-step sync; the run
    # stops and resumes from its last complete checkpoint) or `skip` (checked every step at the cost of
    # one host sync; the step is skipped and counted in optim/skipped_steps)
    nonfinite: str = "stop"
    max_skipped_steps: int = 10  # skip: consecutive skipped steps before the run stops anyway


@dataclass
class ScheduleConfig:
    name: str = "cosine"
    warmup_steps: int = 600
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2  # wsd: the final fraction of steps that decays linearly to min_lr


@dataclass
class ParallelConfig:
    activation_checkpointing: str = "none"  # none | full | selective (every `selective_every`-th block)
    selective_every: int = 2
    compile: bool = False  # torch.compile each block
    replicate: int = 1  # HSDP: world = replicate x shard; 1 = FSDP over all ranks
    reshard_after_forward: bool = True  # every block but the last, whose backward comes first
    # gradient accumulation: reduce gradients after every micro-batch, or only after a step's last one
    # (the others accumulate unsharded float32 gradients); auto = last on a world of one
    grad_sync: str = "auto"


@dataclass
class PrecisionConfig:
    name: str = "auto"  # auto = bf16 autocast on GPU, fp32 on CPU


@dataclass
class CheckpointConfig:
    interval: int = 1000
    keep_latest: int = 2
    resume: bool = True
    signal_check_interval: int = 10  # steps between the ranks' checks for SIGTERM/SIGUSR1/max_minutes


@dataclass
class WandbConfig:
    mode: str = "offline"
    project: str = "sparse_llm"
    entity: Optional[str] = None


@dataclass
class LoggingConfig:
    interval: int = 10
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class TelemetryConfig:
    energy: bool = True                # NVML total-energy counter; reported as unavailable without NVML / GPU
    memory: bool = True                # mem/*_pct of device, allocation retries, OOMs (CUDA only)
    media_interval: int = 500          # wandb heat map + histograms every N steps (rounded up to a log step); 0 = off
    profile_start_step: int = 10       # first step the torch.profiler window records
    profile_steps: int = 0             # steps in the profiler window; 0 = off
    memory_snapshot_step: int = 0      # dump a CUDA memory snapshot after this step; 0 = off
    memory_snapshot_max_entries: int = 100000


@dataclass
class HardwareConfig:
    name: str = "auto"
    # dense bf16 tensor-core peak per device in TFLOP/s; null = look the device name up in `peak_bf16_tflops`
    peak_tflops: Optional[float] = None
    # key: a substring of torch.cuda.get_device_name() (case-insensitive; the longest matching key wins)
    peak_bf16_tflops: Dict[str, float] = field(default_factory=dict)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    kernel: KernelConfig = field(default_factory=KernelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    run_name: str = "tiny"
    output_dir: str = "runs"
    seed: int = 0
    device: str = "auto"
    max_steps: int = 1000
    max_minutes: float = 0.0  # > 0: save and exit cleanly after this much wall time
    tokens_per_step: int = 16384
    micro_batch_size: int = 16
    eval_interval: int = 100
    eval_batches: int = 8


CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def compose_config(overrides: Sequence[str] = (), conf_dir: Path = CONF_DIR) -> "TrainConfig":
    """conf/train.yaml with Hydra overrides (`group=option`, `key=value`), as a typed TrainConfig."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        return OmegaConf.to_object(compose(config_name="train", overrides=list(overrides)))


def register_configs() -> None:
    """Register the schema that conf/train.yaml lists first, so every YAML file and override is
    type-checked against the dataclasses (an unknown key is an error)."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    _require(value in choices, f"{key}={value!r} is not one of {', '.join(choices)}")


def _positive(key: str, value: float) -> None:
    _require(value > 0, f"{key}={value} must be > 0")


def validate(cfg: TrainConfig, world_size: int = 1) -> None:
    """Check every value that the schema's types cannot; raise ConfigError naming the key."""
    m = cfg.model
    for key in ("d_model", "n_layers", "n_heads", "d_ff", "vocab_size", "seq_len"):
        _positive(f"model.{key}", getattr(m, key))
    _require(m.d_model % m.n_heads == 0,
             f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}; "
             f"pick n_heads that divides d_model")
    _require((m.d_model // m.n_heads) % 2 == 0,
             f"model.d_model / model.n_heads = {m.d_model // m.n_heads} must be even for RoPE")
    _choice("sparsity.ffn", cfg.sparsity.ffn, FFN_KINDS)
    _require(cfg.sparsity.l1 >= 0, f"sparsity.l1={cfg.sparsity.l1} must be >= 0 (0 disables the penalty)")
    _require(cfg.sparsity.l1 == 0 or cfg.sparsity.ffn != "swiglu",
             "sparsity.l1 > 0 needs a ReLU FFN: set sparsity.ffn=relu_gated (or sparsity=l1)")
    _require(cfg.sparsity.l1_warmup_steps >= 0, "sparsity.l1_warmup_steps must be >= 0")
    _require(not cfg.sparsity.reinit_dead or cfg.sparsity.ffn != "swiglu",
             "sparsity.reinit_dead=true needs a ReLU FFN (dead units are defined by ReLU zeros): "
             "set sparsity.ffn=relu_gated or relu, or sparsity.reinit_dead=false")
    _positive("sparsity.reinit_window_tokens", cfg.sparsity.reinit_window_tokens)
    _choice("kernel.name", cfg.kernel.name, KERNELS)
    _require(cfg.kernel.name == "torch" or cfg.sparsity.ffn != "swiglu",
             f"kernel={cfg.kernel.name} needs a ReLU FFN; use kernel=torch with sparsity=dense")
    _choice("data.name", cfg.data.name, ("default", "shards", "synthetic"))
    _require(cfg.data.name != "shards" or bool(cfg.data.path),
             "data=shards needs data.path=<directory with manifest.json> (made by `python data/prepare.py`)")
    _positive("optim.lr", cfg.optim.lr)
    _require(cfg.optim.weight_decay >= 0, "optim.weight_decay must be >= 0")
    _require(all(0 <= b < 1 for b in cfg.optim.betas), f"optim.betas={list(cfg.optim.betas)} must lie in [0, 1)")
    _require(cfg.optim.grad_clip >= 0, "optim.grad_clip must be >= 0 (0 disables clipping)")
    _choice("schedule.name", cfg.schedule.name, SCHEDULES)
    _require(cfg.schedule.warmup_steps >= 0, "schedule.warmup_steps must be >= 0")
    _require(0 <= cfg.schedule.min_lr_ratio <= 1, "schedule.min_lr_ratio must lie in [0, 1]")
    _require(0 < cfg.schedule.decay_fraction <= 1, "schedule.decay_fraction must lie in (0, 1]")
    _choice("precision.name", cfg.precision.name, PRECISIONS)
    _choice("parallel.activation_checkpointing", cfg.parallel.activation_checkpointing, AC_MODES)
    _positive("parallel.selective_every", cfg.parallel.selective_every)
    _positive("parallel.replicate", cfg.parallel.replicate)
    _choice("parallel.grad_sync", cfg.parallel.grad_sync, GRAD_SYNC_MODES)
    _require(world_size % cfg.parallel.replicate == 0,
             f"parallel.replicate={cfg.parallel.replicate} must divide the world size {world_size}")
    _choice("logging.wandb.mode", cfg.logging.wandb.mode, WANDB_MODES)
    _positive("logging.interval", cfg.logging.interval)
    _validate_telemetry(cfg)
    _positive("checkpoint.interval", cfg.checkpoint.interval)
    _positive("checkpoint.keep_latest", cfg.checkpoint.keep_latest)
    _positive("checkpoint.signal_check_interval", cfg.checkpoint.signal_check_interval)
    _choice("optim.nonfinite", cfg.optim.nonfinite, ("stop", "skip"))
    _positive("optim.max_skipped_steps", cfg.optim.max_skipped_steps)
    _require(cfg.max_minutes >= 0, "max_minutes must be >= 0 (0 = no limit)")
    _positive("max_steps", cfg.max_steps)
    _positive("micro_batch_size", cfg.micro_batch_size)
    _positive("eval_interval", cfg.eval_interval)
    _require(cfg.eval_batches >= 0, "eval_batches must be >= 0")
    _require(bool(cfg.run_name) and "/" not in cfg.run_name,
             f"run_name={cfg.run_name!r} must be a non-empty name without '/'")
    grad_accumulation_steps(cfg, world_size)


def _validate_telemetry(cfg: TrainConfig) -> None:
    t = cfg.telemetry
    _require(t.media_interval >= 0, "telemetry.media_interval must be >= 0 (0 disables wandb media)")
    _require(t.profile_steps >= 0, "telemetry.profile_steps must be >= 0 (0 disables the profiler)")
    _require(t.profile_start_step >= 1, "telemetry.profile_start_step must be >= 1 (the first step is 1)")
    _require(t.memory_snapshot_step >= 0, "telemetry.memory_snapshot_step must be >= 0 (0 disables the snapshot)")
    _positive("telemetry.memory_snapshot_max_entries", t.memory_snapshot_max_entries)
    _require(cfg.hardware.peak_tflops is None or cfg.hardware.peak_tflops > 0,
             f"hardware.peak_tflops={cfg.hardware.peak_tflops} must be > 0, or null to look the device up "
             f"in hardware.peak_bf16_tflops")
    for key, value in cfg.hardware.peak_bf16_tflops.items():
        _require(bool(key.strip()) and value > 0,
                 f"hardware.peak_bf16_tflops[{key!r}]={value} needs a non-empty device-name key and a value > 0")


def grad_accumulation_steps(cfg: TrainConfig, world_size: int) -> int:
    """Micro-batches per optimizer step on each rank, derived from tokens_per_step."""
    tokens_per_micro_step = cfg.micro_batch_size * cfg.model.seq_len * world_size
    _require(cfg.tokens_per_step > 0 and cfg.tokens_per_step % tokens_per_micro_step == 0,
             f"tokens_per_step={cfg.tokens_per_step} must be a positive multiple of micro_batch_size x "
             f"model.seq_len x world size = {cfg.micro_batch_size} x {cfg.model.seq_len} x {world_size} "
             f"= {tokens_per_micro_step}; {_batch_fix(cfg, world_size)}")
    return cfg.tokens_per_step // tokens_per_micro_step


def _batch_fix(cfg: TrainConfig, world_size: int) -> str:
    """The overrides that would make tokens_per_step fit this world size."""
    per_rank_sequence = cfg.model.seq_len * world_size
    step = max(cfg.tokens_per_step, 1)
    fit = next((m for m in range(cfg.micro_batch_size, 0, -1) if step % (m * per_rank_sequence) == 0), None)
    rounded = -(-step // (cfg.micro_batch_size * per_rank_sequence)) * cfg.micro_batch_size * per_rank_sequence
    return f"set tokens_per_step={rounded}" + (f" or micro_batch_size={fit}" if fit else "")
