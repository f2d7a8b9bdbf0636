"""The experiment scripts' whole model: bench_model's setup (a model config with the hybrid kernels
on synthetic data, nothing logged or kept) in a scratch directory, for one process on CUDA. Used as
`with model_trainer("0p5b", world) as trainer:`, then bench_model.calibrate_gate_sparsity."""
import contextlib
import tempfile

from sparse_llm.config import compose_config, validate
from sparse_llm.train.run import build_trainer


@contextlib.contextmanager
def model_trainer(model_name: str, world):
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config([f"model={model_name}", "sparsity=l1", "kernel=hybrid", "data=synthetic",
                              "eval_batches=0", "logging.wandb.mode=disabled", "checkpoint.resume=false",
                              f"output_dir={tmp}", "telemetry.energy=false"])
        cfg.tokens_per_step = cfg.micro_batch_size * cfg.model.seq_len
        validate(cfg, 1)
        trainer = build_trainer(cfg, world)
        try:
            yield trainer
        finally:
            trainer.logger.close()
