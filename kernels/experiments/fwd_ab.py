"""Whole-model inference forward with TwELL, gate kernel on vs off (cuBLAS + pack), same model, same
run, 3 rounds; gates calibrated to 29 active units.
    PYTHONPATH=$PWD:/tmp/site python kernels/experiments/fwd_ab.py 0p5b 1b
"""
import sys, tempfile, time
import torch
from sparse_llm.config import compose_config, validate
from sparse_llm.parallel.distributed import init_distributed, shutdown
from sparse_llm.train.run import build_trainer
from sparse_llm.study.bench_model import calibrate_gate_sparsity
from sparse_llm.model.ffn import FeedForward
from sparse_llm.kernels import twell

world = init_distributed("cuda")
for name in sys.argv[1:]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config([f"model={name}", "sparsity=l1", "kernel=hybrid", "data=synthetic", "eval_batches=0",
                              "logging.wandb.mode=disabled", "checkpoint.resume=false", f"output_dir={tmp}",
                              "max_steps=1", "telemetry.energy=false"])
        cfg.tokens_per_step = cfg.micro_batch_size * cfg.model.seq_len
        validate(cfg, 1)
        trainer = build_trainer(cfg, world)
        tokens = trainer.train_loader.next_batch()[0].to(world.device)
        act = calibrate_gate_sparsity(trainer.model, tokens[:1], 29)
        model = trainer.model
        for m in model.modules():
            if isinstance(m, FeedForward):
                m.kernel = "twell"
        model.eval()
        with torch.no_grad():
            res = {0: [], 1: []}
            for rnd in range(3):
                for gk in ((1, 0) if rnd % 2 == 0 else (0, 1)):
                    twell.set_default_config(twell.FusedConfig(gate_kernel=gk))
                    for _ in range(3):
                        model(tokens)
                    torch.cuda.synchronize()
                    t = time.perf_counter()
                    for _ in range(10):
                        model(tokens)
                    torch.cuda.synchronize()
                    res[gk].append(tokens.numel() * 10 / (time.perf_counter() - t))
            twell.set_default_config(None)
            print(f"{name}: calibrated {sum(act) / len(act):.1f} active; forward tok/s gate_kernel=1 "
                  f"{sorted(res[1])[1]:.0f} vs cuBLAS+pack {sorted(res[0])[1]:.0f} -> {sorted(res[1])[1] / sorted(res[0])[1]:.3f}x  {res}",
                  flush=True)
        trainer.logger.close()
        del trainer, model
        torch.cuda.empty_cache()
shutdown()
