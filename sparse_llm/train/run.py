"""Build a training run from a validated config: run directory, data, model, optimizer, trainer."""
from __future__ import annotations

import json
import logging
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import OmegaConf

from sparse_llm.config import ConfigError, TrainConfig, grad_accumulation_steps
from sparse_llm.data import TokenLoader, ensure_default_corpus, load_manifest
from sparse_llm.data.synthetic import SyntheticLoader
from sparse_llm.model import Transformer, count_params
from sparse_llm.parallel.distributed import World, barrier
from sparse_llm.parallel.fsdp import apply_parallelism, build_mesh
from sparse_llm.train import checkpoint
from sparse_llm.train.loggers import build_logger
from sparse_llm.train.routing import KernelRouting
from sparse_llm.train.telemetry import build_callbacks
from sparse_llm.train.trainer import Trainer

log = logging.getLogger("sparse_llm")
# config sections a resumed run must share with the checkpoint it continues
ARCHITECTURE_KEYS = ("model", "sparsity.ffn")


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        flat.update(_flatten(value, name + ".") if isinstance(value, dict) else {name: value})
    return flat


def _architecture_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    old, new = _flatten(saved), _flatten(current)
    keys = [k for k in set(old) | set(new) if any(k == a or k.startswith(a + ".") for a in ARCHITECTURE_KEYS)]
    return sorted(f"{k}: checkpoint {old.get(k)!r} vs now {new.get(k)!r}" for k in keys if old.get(k) != new.get(k))


def prepare_run_dir(cfg: TrainConfig, world: World) -> Path:
    """Create (rank 0) or check the run directory; refuse anything that would overwrite a run."""
    run_dir = Path(cfg.output_dir) / cfg.run_name
    has_checkpoints = bool(checkpoint.list_complete(run_dir))
    if has_checkpoints and not cfg.checkpoint.resume:
        raise ConfigError(f"{run_dir} already holds checkpoints; set checkpoint.resume=true to continue that run, "
                          f"or choose another run_name")
    saved_config = run_dir / "config.yaml"
    current = config_dict(cfg)
    if has_checkpoints and saved_config.is_file():
        diff = _architecture_diff(OmegaConf.to_container(OmegaConf.load(saved_config)), current)
        if diff:
            raise ConfigError(f"cannot resume {run_dir}: its checkpoints were made with another model ("
                              + "; ".join(diff) + "); choose another run_name")
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not saved_config.exists():
            saved_config.write_text(OmegaConf.to_yaml(current))
        with open(run_dir / "launches.jsonl", "a") as file:
            file.write(json.dumps(_launch_record(world)) + "\n")
    barrier()
    return run_dir


def _launch_record(world: World) -> dict[str, Any]:
    """Provenance of each launch (append-only, so a resumed run keeps the history)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    versions = {}
    for package in ("torch", "numpy", "hydra-core", "wandb", "sentencepiece", "cupy-cuda12x", "cupy-cuda13x"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return {
        "time": time.time(), "argv": sys.argv, "git_commit": commit, "python": platform.python_version(),
        "packages": versions, "world_size": world.size, "device": str(world.device),
        "gpu": torch.cuda.get_device_name(world.device) if world.device.type == "cuda" else None,
    }


def resolve_manifest(cfg: TrainConfig, world: World) -> Path:
    """The manifest of the configured data; rank 0 prepares the default corpus on first use."""
    if cfg.data.name == "shards":
        return Path(cfg.data.path) / "manifest.json"
    root = Path(cfg.data.root)
    if world.is_main:
        ensure_default_corpus(root, cfg.data.vocab_size)
    barrier()
    return root / "manifest.json"


def build_loaders(cfg: TrainConfig, world: World):
    """(train, val) loaders of the configured data; val is None when eval_batches is 0."""
    loader_args = dict(seq_len=cfg.model.seq_len, micro_batch_size=cfg.micro_batch_size,
                       dp_rank=world.rank, dp_world=world.size, seed=cfg.seed)
    if cfg.data.name == "synthetic":
        make = lambda split: SyntheticLoader(cfg.model.vocab_size, split, **loader_args)  # noqa: E731
    else:
        manifest_path = resolve_manifest(cfg, world)
        manifest = load_manifest(manifest_path)
        if manifest.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"the tokenizer of {manifest_path} has {manifest.vocab_size} tokens but "
                              f"model.vocab_size={cfg.model.vocab_size}; set model.vocab_size>={manifest.vocab_size}")
        make = lambda split: TokenLoader(manifest, split, **loader_args)  # noqa: E731
    return make("train"), (make("val") if cfg.eval_batches > 0 else None)


def build_model(cfg: TrainConfig, world: World) -> Transformer:
    """Build on the meta device, apply parallelism, then materialize each rank's shards and initialize
    them (the weights depend on the seed only, not on the world size)."""
    with torch.device("meta"):
        model = Transformer(cfg.model, cfg.sparsity.ffn, cfg.kernel.name)
    mesh = build_mesh(world.size, world.device, cfg.parallel)
    apply_parallelism(model, cfg.parallel, mesh, cfg.precision.name, world.device)
    model.to_empty(device=world.device)
    model.init_weights(cfg.seed)
    return model


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norm gains)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                             fused=device.type == "cuda")


def check_kernel_runtime(cfg: TrainConfig, device: torch.device) -> tuple[Optional[str], Optional[str]]:
    """What the CUDA kernels need, checked before anything is built or written: CuPy, compute
    capability 8.0+, bf16 / fp16 compute and an FFN shape they take. kernel=twell would fail at the
    first evaluation: an error. kernel=hybrid would run its exact PyTorch reference at dense speed, and
    kernel=auto keeps such layers dense (KernelRouting): warnings. Returns `kernel_problems(cfg)` with
    the GPU's own problem, if any."""
    kernel = cfg.kernel.name
    if kernel == "torch":
        return None, None
    problems = kernel_problems(cfg)
    if device.type != "cuda":
        return problems
    try:
        import cupy  # noqa: F401
    except ImportError as error:
        raise ConfigError(f"kernel={kernel} needs CuPy on GPU machines ({error}); install it with "
                          f"pip install -e \".[gpu]\" (CUDA 12) or \".[gpu-cu13]\" (CUDA 13), or use kernel=torch") from error
    from sparse_llm.kernels.loader import capability_problem

    old_gpu = capability_problem(*compute_capability(device))
    if old_gpu:
        problems = (problems[0] or old_gpu, problems[1] or old_gpu)
    inference_problem, training_problem = problems
    if kernel == "twell" and inference_problem:
        raise ConfigError(f"kernel=twell runs the TwELL kernels for evaluation, which cannot take this run: "
                          f"{inference_problem}; use kernel=hybrid or kernel=torch"
                          + (", or precision=bf16" if cfg.precision.name == "fp32" else ""))
    if kernel == "hybrid" and training_problem:
        log.warning("kernel=hybrid: the hybrid FFN runs its PyTorch reference (exact, at dense speed) since %s",
                    training_problem)
    if kernel == "auto":
        for path, problem in (("training", training_problem), ("evaluation", inference_problem)):
            if problem:
                log.warning("kernel=auto: every layer stays dense in %s, since %s", path, problem)
    return problems


def compute_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def kernel_problems(cfg: TrainConfig) -> tuple[Optional[str], Optional[str]]:
    """Why the TwELL (inference) and the hybrid (training) kernels cannot take this run, or None."""
    from sparse_llm.kernels import hybrid, twell

    m = cfg.model
    fp32 = "precision=fp32 (the kernels take bf16 / fp16 activations)" if cfg.precision.name == "fp32" else None
    shape = f" (model.d_model={m.d_model}, model.d_ff={m.d_ff})"
    twell_shape, hybrid_shape = twell.shape_problem(m.d_model, m.d_ff), hybrid.shape_problem(m.d_model, m.d_ff)
    return (twell_shape + shape if twell_shape else fp32), (hybrid_shape + shape if hybrid_shape else fp32)


def build_trainer(cfg: TrainConfig, world: World) -> Trainer:
    inference_problem, training_problem = check_kernel_runtime(cfg, world.device)
    grad_accum = grad_accumulation_steps(cfg, world.size)
    train_loader, val_loader = build_loaders(cfg, world)  # bad data fails before the run directory exists
    run_dir = prepare_run_dir(cfg, world)
    model = build_model(cfg, world)
    optimizer = build_optimizer(model, cfg, world.device)
    logger = build_logger(cfg.logging.wandb, run_dir, cfg.run_name, config_dict(cfg), cfg.max_steps, world.is_main)
    callbacks = build_callbacks(cfg, world, run_dir)
    if cfg.kernel.name == "auto":
        callbacks.append(KernelRouting(cfg.model.d_model, cfg.model.d_ff, training=training_problem is None,
                                       inference=inference_problem is None))
    trainer = Trainer(cfg, world, model, optimizer, train_loader, val_loader, logger, run_dir, grad_accum,
                      callbacks=callbacks)
    if cfg.checkpoint.resume:
        path = trainer.resume()
        if path is not None:
            log.info("resumed from %s (step %d)", path, trainer.step)
    log.info("model %s: %.2fM parameters, %s FFN, kernel=%s, %d micro-batch(es) of %d x %d per step, device %s",
             cfg.model.name, count_params(cfg.model, cfg.sparsity.ffn) / 1e6, cfg.sparsity.ffn, cfg.kernel.name,
             grad_accum, cfg.micro_batch_size, cfg.model.seq_len, world.device)
    return trainer
