"""Random tokens with the TokenLoader interface: throughput benchmarks without a corpus
(`data=synthetic`). Deterministic in (seed, cursor) and resumable like the real loader."""
from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import torch

Batch = tuple[torch.Tensor, torch.Tensor]


class SyntheticLoader:
    def __init__(self, vocab_size: int, split: str, seq_len: int, micro_batch_size: int, dp_rank: int = 0,
                 dp_world: int = 1, seed: int = 0):
        self.vocab_size, self.split, self.seq_len = vocab_size, split, seq_len
        self.micro_batch_size, self.dp_rank, self.dp_world, self.seed = micro_batch_size, dp_rank, dp_world, seed
        self.cursor = 0

    def _batch(self, index: int) -> Batch:
        # a digest, not hash(): Python salts str hashes per process, which gave every process (a resumed
        # run, each bench_model run) other tokens for the same (seed, split, index, rank)
        key = repr((self.seed, self.split, index, self.dp_rank)).encode()
        seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1
        generator = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, self.vocab_size, (self.micro_batch_size, self.seq_len + 1), generator=generator)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def next_batch(self) -> Batch:
        batch = self._batch(self.cursor)
        self.cursor += 1
        return batch

    def val_batches(self, max_batches: int | None = None) -> Iterator[Batch]:
        for index in range(max_batches or 1):
            yield self._batch(-1 - index)

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor, "seed": self.seed, "seq_len": self.seq_len, "fingerprint": "synthetic"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cursor = state["cursor"]
