"""Where does bench_model's sparsity drift come from? Calibrate the 0.5B model's gates (the whole
micro-batch A, as bench_model does, or with --one-sequence its first sequence, as it used to), then
measure the active units per layer on A, on another batch B, and on B after 12 training steps.

    PYTHONPATH=$PWD:/tmp/site python kernels/experiments/calib_check.py [--one-sequence] [--model 1p5b] [--lr 1e-7]
"""
import sys
import tempfile
from sparse_llm.config import compose_config, validate
from sparse_llm.parallel.distributed import init_distributed, shutdown
from sparse_llm.train.run import build_trainer
from sparse_llm.study.bench_model import calibrate_gate_sparsity, gate_activity

world = init_distributed("cuda")

def measure(model, tokens):
    return [round(float(active.sum(1).float().mean()), 1) for active in gate_activity(model, tokens)]

with tempfile.TemporaryDirectory() as tmp:
    lr = sys.argv[sys.argv.index("--lr") + 1] if "--lr" in sys.argv else "1e-7"
    model_name = sys.argv[sys.argv.index("--model") + 1] if "--model" in sys.argv else "0p5b"
    cfg = compose_config([f"model={model_name}", "sparsity=l1", "kernel=hybrid", "data=synthetic", "eval_batches=0",
                          "logging.wandb.mode=disabled", "checkpoint.resume=false", f"output_dir={tmp}",
                          "max_steps=12", "logging.interval=1", f"optim.lr={lr}", "schedule.warmup_steps=0",
                          "telemetry.energy=false", "checkpoint.interval=1000000"])
    cfg.tokens_per_step = cfg.micro_batch_size * cfg.model.seq_len
    validate(cfg, 1)
    trainer = build_trainer(cfg, world)
    a = trainer.train_loader.next_batch()[0].to(world.device)
    b = trainer.train_loader.next_batch()[0].to(world.device)
    calibration = a[:1] if "--one-sequence" in sys.argv else a
    print("calibrated:", [round(v, 1) for v in calibrate_gate_sparsity(trainer.model, calibration, 29)], flush=True)
    print("same seq, bf16 product:", measure(trainer.model, a[:1]), flush=True)
    print("whole batch A:", measure(trainer.model, a), flush=True)
    print("batch B:", measure(trainer.model, b), flush=True)
    from sparse_llm.train.trainer import Callback

    class PrintActive(Callback):
        def on_step_end(self, trainer, step, metrics):
            if metrics:
                print(f"step {step}: active/token {metrics.get('sparsity/active_per_token/mean'):.1f}, "
                      f"ce {metrics.get('loss/ce', float('nan')):.4f}, lr {metrics.get('optim/lr', 0):.1e}", flush=True)

    trainer.callbacks.append(PrintActive())
    last = trainer.fit()
    print("metric after 12 steps:", last.get("sparsity/active_per_token/mean"), flush=True)
    print("batch B after steps:", measure(trainer.model, b), flush=True)
    trainer.logger.close()
shutdown()
