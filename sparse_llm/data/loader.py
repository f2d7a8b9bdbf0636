"""Deterministic, resumable token loader over memory-mapped shards.

Window w covers tokens [w*seq_len, w*seq_len + seq_len + 1) of the split's concatenated shards
(inputs = window[:-1], targets = window[1:]), so every token after the first is a target exactly
once per epoch. Train order: for epoch e, the permutation of all windows drawn from
numpy PCG64(seed, e); positions in the infinite sequence of epochs are counted by a global
cursor. Each `next_batch` consumes `micro_batch_size * dp_world` positions; rank r takes rows
[r*micro_batch_size, (r+1)*micro_batch_size). Because the cursor is global, a run can resume on a
different dp_world and continue from the same position in the stream.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from .manifest import SPLITS, Manifest, load_manifest
from .shards import DataError, open_shard

Batch = tuple[torch.Tensor, torch.Tensor]


class TokenLoader:
    def __init__(
        self,
        manifest: str | os.PathLike | Manifest,
        split: str,
        seq_len: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_world: int = 1,
        seed: int = 0,
    ) -> None:
        if split not in SPLITS:
            raise DataError(f"split must be one of {SPLITS}, got {split!r}")
        if seq_len < 1 or micro_batch_size < 1:
            raise DataError(f"seq_len and micro_batch_size must be >= 1, got {seq_len} and {micro_batch_size}")
        if not 0 <= dp_rank < dp_world:
            raise DataError(f"dp_rank must be in [0, dp_world={dp_world}), got {dp_rank}")
        # a loaded Manifest (already checked) or the path of one
        self.manifest: Manifest = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
        self.split, self.seq_len, self.micro_batch_size = split, seq_len, micro_batch_size
        self.dp_rank, self.dp_world, self.seed = dp_rank, dp_world, seed
        shards = [s for s in self.manifest.splits[split] if s.tokens > 0]
        self._arrays = [open_shard(s.path) for s in shards]
        self._starts = np.cumsum([0] + [len(a) for a in self._arrays])
        self.total_tokens = int(self._starts[-1])
        where = f"split {split!r} of {self.manifest.path}"
        if self.total_tokens == 0:
            raise DataError(f"{where} is empty; prepare it with documents (e.g. --val-fraction > 0 for val)")
        self.num_windows = (self.total_tokens - 1) // seq_len
        if self.num_windows < 1:
            raise DataError(
                f"seq_len {seq_len} needs {seq_len + 1} tokens but {where} has only {self.total_tokens}; "
                "lower seq_len or prepare more data"
            )
        self.cursor = 0
        self._perms: dict[int, np.ndarray] = {}
        self._pin = torch.cuda.is_available()

    # ------------------------------------------------------------ order

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.dp_world

    @property
    def epoch(self) -> int:
        return self.cursor // self.num_windows

    def _perm(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            perm = self._perms[epoch] = rng.permutation(self.num_windows)
        return perm

    def _window_ids(self, positions: np.ndarray) -> np.ndarray:
        if self.split != "train":
            return positions % self.num_windows
        epochs, offsets = np.divmod(positions, self.num_windows)
        ids = np.empty_like(positions)
        for e in np.unique(epochs):
            mask = epochs == e
            ids[mask] = self._perm(int(e))[offsets[mask]]
        return ids

    # ------------------------------------------------------------ reading

    def _tokens(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start+n) of the concatenated shards, as int64."""
        out = np.empty(n, dtype=np.int64)
        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        done = 0
        while done < n:
            a, lo = self._arrays[i], start + done - int(self._starts[i])
            take = min(n - done, len(a) - lo)
            out[done : done + take] = a[lo : lo + take]
            done += take
            i += 1
        return out

    def _batch(self, window_ids: np.ndarray) -> Batch:
        L = self.seq_len
        rows = np.stack([self._tokens(int(w) * L, L + 1) for w in window_ids])
        x, y = torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())
        if self._pin:
            x, y = x.pin_memory(), y.pin_memory()
        return x, y

    def next_batch(self) -> Batch:
        """This rank's (inputs, targets), int64 [micro_batch_size, seq_len]; advances the global cursor."""
        first = self.cursor + self.dp_rank * self.micro_batch_size
        batch = self._batch(self._window_ids(np.arange(first, first + self.micro_batch_size)))
        self.cursor += self.global_batch
        return batch

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def val_batches(self, max_batches: int | None = None) -> Iterator[Batch]:
        """Windows in fixed order, split across ranks; every rank gets the same number of batches
        (a trailing partial global batch is dropped). Does not touch the cursor."""
        steps = self.num_windows // self.global_batch
        if steps == 0:
            raise DataError(
                f"split {self.split!r} of {self.manifest.path} has {self.num_windows} windows of {self.seq_len} "
                f"tokens, fewer than one global batch ({self.global_batch}); lower the batch or seq_len"
            )
        if max_batches is not None:
            steps = min(steps, max_batches)
        for step in range(steps):
            first = step * self.global_batch + self.dp_rank * self.micro_batch_size
            yield self._batch(np.arange(first, first + self.micro_batch_size))

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {
            "cursor": self.cursor,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "fingerprint": self.manifest.fingerprint,
            "split": self.split,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        fp, seq_len = state.get("fingerprint"), state.get("seq_len")
        if fp != self.manifest.fingerprint or seq_len != self.seq_len:
            raise DataError(
                f"the data changed since this loader state was saved: it has fingerprint {fp} and seq_len {seq_len}, "
                f"{self.manifest.path} now gives fingerprint {self.manifest.fingerprint} and seq_len {self.seq_len}; "
                "resume with the same data and seq_len, or start a fresh run"
            )
        if state.get("split", self.split) != self.split:
            raise DataError(f"loader state is for split {state['split']!r}, this loader reads {self.split!r}")
        self.cursor = int(state["cursor"])
        self.seed = int(state["seed"])
        self._perms.clear()

    def describe(self, token_budget: int | None = None) -> dict[str, Any]:
        """Sizes for logging; `epochs` is how many passes `token_budget` training tokens make."""
        tokens_per_epoch = self.num_windows * self.seq_len
        info: dict[str, Any] = {
            "manifest": str(self.manifest.path),
            "fingerprint": self.manifest.fingerprint,
            "split": self.split,
            "tokens": self.total_tokens,
            "documents": self.manifest.documents.get(self.split, 0),
            "windows": self.num_windows,
            "seq_len": self.seq_len,
            "global_batch": self.global_batch,
            "steps_per_epoch": self.num_windows / self.global_batch,
            "cursor": self.cursor,
            "epoch": self.epoch,
        }
        if token_budget is not None:
            info["epochs"] = token_budget / tokens_per_epoch
        return info
