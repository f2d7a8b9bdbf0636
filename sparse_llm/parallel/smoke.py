"""One all-reduce and one training step of a tiny model per rank (run by launch/smoke.sh)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from sparse_llm.config import ModelConfig, ParallelConfig
from sparse_llm.model import Transformer
from sparse_llm.parallel.distributed import init_distributed, shutdown
from sparse_llm.parallel.fsdp import apply_parallelism, build_mesh


def main() -> None:
    world = init_distributed("auto")
    ones = torch.ones(1, device=world.device)
    dist.all_reduce(ones)
    assert ones.item() == world.size, f"all-reduce gave {ones.item()} on {world.size} ranks"
    cfg = ModelConfig(d_model=64, n_layers=2, n_heads=4, d_ff=256, vocab_size=512, seq_len=64)
    with torch.device("meta"):
        model = Transformer(cfg)
    apply_parallelism(model, ParallelConfig(), build_mesh(world.size, world.device, ParallelConfig()), "auto",
                      world.device)
    model.to_empty(device=world.device)
    model.init_weights(seed=0)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len + 1), device=world.device)
    logits = model(tokens[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
    loss.backward()
    print(f"rank {world.rank}/{world.size} on {world.device}: all-reduce ok, step ok (loss {loss.item():.3f})",
          flush=True)
    shutdown()


if __name__ == "__main__":
    main()
