"""`manifest.json`: the tokenizer, dtype and per-split shard lists of a prepared corpus.

Schema (version 1; paths are relative to the manifest's directory)::

    {"format": "sparse_llm.tokens", "version": 1, "dtype": "uint16",
     "tokenizer": {"path": "tokenizer.model", "sha256": "...", "vocab_size": 8192, "eos_id": 2},
     "splits": {"train": {"tokens": N, "documents": D, "shards": [{"path": "train_000000.bin", "tokens": n}]},
                "val": {...}},
     "source": {...}}   # what produced it (inputs, options); informational

The fingerprint is a short hash of the whole content: any change to shards, tokenizer or
source yields a new fingerprint, which the loader stores in its checkpointed state.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .shards import DataError, atomic_write_bytes, fix_hint, read_header

MANIFEST_NAME = "manifest.json"
FORMAT = "sparse_llm.tokens"
VERSION = 1
SPLITS = ("train", "val")


@dataclass(frozen=True)
class ShardInfo:
    path: Path
    tokens: int


@dataclass(frozen=True)
class Manifest:
    path: Path
    dtype: str
    tokenizer_path: Path
    tokenizer_sha256: str
    vocab_size: int
    eos_id: int
    splits: dict[str, list[ShardInfo]]
    documents: dict[str, int]
    fingerprint: str
    raw: dict[str, Any] = field(repr=False)

    @property
    def root(self) -> Path:
        return self.path.parent

    def tokens(self, split: str) -> int:
        return sum(s.tokens for s in self.splits.get(split, []))


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def canonical_json(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=1, ensure_ascii=False) + "\n"


def fingerprint(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def write_manifest(path: str | os.PathLike, data: dict[str, Any]) -> Path:
    path = Path(path)
    atomic_write_bytes(path, [canonical_json(data).encode()])
    return path


def resolve_manifest_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p / MANIFEST_NAME if p.is_dir() else p


def load_manifest(path: str | os.PathLike, check_shards: bool = True) -> Manifest:
    """Read and validate a manifest (file or its directory).

    Checks the JSON schema, the tokenizer file's sha256, and (with `check_shards`) every shard's
    header and size against the recorded token counts. Any problem raises DataError."""
    path = resolve_manifest_path(path)
    hint = fix_hint(path.parent)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(
            f"manifest {path} not found; prepare data first: `python data/prepare.py --input ... --out {path.parent}`"
        ) from None
    except OSError as e:
        raise DataError(f"cannot read manifest {path} ({e.strerror}); {hint}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"manifest {path} is not valid JSON ({e.msg} at line {e.lineno}); {hint}") from None

    def bad(what: str) -> DataError:
        return DataError(f"manifest {path}: {what}; {hint}")

    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise bad(f"not a {FORMAT} manifest")
    if raw.get("version") != VERSION:
        raise bad(f"format version {raw.get('version')!r}, this code reads {VERSION}")
    try:
        dtype = str(raw["dtype"])
        tok = raw["tokenizer"]
        tok_path = path.parent / str(tok["path"])
        tok_sha = str(tok["sha256"])
        vocab_size = int(tok["vocab_size"])
        eos_id = int(tok["eos_id"])
        splits_raw = raw["splits"]
        splits: dict[str, list[ShardInfo]] = {}
        documents: dict[str, int] = {}
        for name in SPLITS:
            entry = splits_raw[name]
            documents[name] = int(entry.get("documents", 0))
            splits[name] = [ShardInfo(path.parent / str(s["path"]), int(s["tokens"])) for s in entry["shards"]]
            if sum(s.tokens for s in splits[name]) != int(entry["tokens"]):
                raise bad(f"split {name!r} token total does not match its shards")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        if isinstance(e, DataError):
            raise
        raise bad(f"missing or malformed field ({type(e).__name__}: {e})") from None
    if dtype not in ("uint16", "uint32"):
        raise bad(f"unknown dtype {dtype!r}")
    if vocab_size > (65536 if dtype == "uint16" else 2**32):
        raise bad(f"vocab_size {vocab_size} does not fit dtype {dtype}")

    if not tok_path.is_file():
        raise DataError(f"tokenizer {tok_path} named by manifest {path} is missing; {hint}")
    actual = sha256_file(tok_path)
    if actual != tok_sha:
        raise DataError(
            f"tokenizer {tok_path} has sha256 {actual[:12]}..., manifest {path} expects {tok_sha[:12]}... "
            f"(the tokenizer changed after the shards were written); {hint}"
        )
    if check_shards:
        for shards in splits.values():
            for s in shards:
                sdtype, count = read_header(s.path, hint)
                if sdtype != dtype:
                    raise DataError(f"shard {s.path} is {sdtype}, manifest {path} says {dtype}; {hint}")
                if count != s.tokens:
                    raise DataError(f"shard {s.path} holds {count} tokens, manifest {path} says {s.tokens}; {hint}")
    return Manifest(
        path=path,
        dtype=dtype,
        tokenizer_path=tok_path,
        tokenizer_sha256=tok_sha,
        vocab_size=vocab_size,
        eos_id=eos_id,
        splits=splits,
        documents=documents,
        fingerprint=fingerprint(raw),
        raw=raw,
    )
