"""Binary token shards: a 64-byte header, then little-endian uint16 or uint32 tokens.

Header layout (little-endian): magic ``b"SLLMTOK\\0"`` (8 bytes), format version (u32),
dtype code (u32: 1 = uint16, 2 = uint32), token count (u64), zero padding to 64 bytes.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

MAGIC = b"SLLMTOK\0"
VERSION = 1
HEADER_BYTES = 64
_HEADER = struct.Struct("<8sIIQ")
_CODES: dict[int, np.dtype] = {1: np.dtype("<u2"), 2: np.dtype("<u4")}
_NAMES = {"uint16": 1, "uint32": 2}

PREPARE_HINT = "re-run `python data/prepare.py --input ... --out {dir} --overwrite`"


class DataError(ValueError):
    """A data file is missing, malformed, or does not match what the caller expects."""


def fix_hint(directory: str | os.PathLike) -> str:
    return PREPARE_HINT.format(dir=directory)


def dtype_for_vocab(vocab_size: int) -> str:
    """The smallest shard dtype name that holds every token id of a vocab of this size."""
    if vocab_size <= 0 or vocab_size > 2**32:
        raise ValueError(f"vocab_size must be in [1, 2**32], got {vocab_size}")
    return "uint16" if vocab_size <= 65536 else "uint32"


def dtype_code(name: str) -> int:
    try:
        return _NAMES[name]
    except KeyError:
        raise DataError(f"unknown shard dtype {name!r}; expected one of {sorted(_NAMES)}") from None


def atomic_write_bytes(path: Path, chunks: list[bytes | memoryview]) -> None:
    """Write to a temp file beside `path`, fsync, then os.replace: readers never see a partial file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            for c in chunks:
                f.write(c)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_shard(path: str | os.PathLike, tokens: np.ndarray, dtype: str | None = None) -> int:
    """Write `tokens` (1-D ints) as a shard atomically; returns the token count.

    `dtype` defaults to uint16 when every id fits, else uint32."""
    path = Path(path)
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {arr.shape}")
    if arr.size and (not np.issubdtype(arr.dtype, np.integer) or int(arr.min()) < 0):
        raise ValueError("tokens must be non-negative integers")
    top = int(arr.max()) if arr.size else 0
    if dtype is None:
        dtype = dtype_for_vocab(top + 1)
    code = dtype_code(dtype)
    np_dtype = _CODES[code]
    if top > np.iinfo(np_dtype).max:
        raise ValueError(f"token id {top} does not fit in {dtype}")
    header = _HEADER.pack(MAGIC, VERSION, code, arr.size).ljust(HEADER_BYTES, b"\0")
    data = np.ascontiguousarray(arr, dtype=np_dtype)
    atomic_write_bytes(path, [header, memoryview(data).cast("B")])
    return int(arr.size)


def read_header(path: str | os.PathLike, hint: str | None = None) -> tuple[str, int]:
    """Validate a shard's header against the file length; returns (dtype name, token count)."""
    path = Path(path)
    hint = hint or fix_hint(path.parent)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise DataError(f"shard {path} is missing; {hint}") from None
    except OSError as e:
        raise DataError(f"cannot read shard {path} ({e.strerror}); {hint}") from None
    if len(raw) < HEADER_BYTES:
        raise DataError(f"shard {path} is shorter than its {HEADER_BYTES}-byte header (truncated); {hint}")
    magic, version, code, count = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise DataError(f"{path} is not a token shard (bad magic {magic!r}); {hint}")
    if version != VERSION:
        raise DataError(f"shard {path} has format version {version}, this code reads {VERSION}; {hint}")
    if code not in _CODES:
        raise DataError(f"shard {path} has unknown dtype code {code}; {hint}")
    expected = HEADER_BYTES + count * _CODES[code].itemsize
    if size != expected:
        what = "truncated" if size < expected else "has trailing bytes"
        raise DataError(
            f"shard {path} {what}: header says {count} tokens ({expected} bytes) but the file has {size} bytes; {hint}"
        )
    name = "uint16" if code == 1 else "uint32"
    return name, int(count)


def open_shard(path: str | os.PathLike, hint: str | None = None) -> np.ndarray:
    """Memory-map a shard's tokens (read-only) after validating its header."""
    name, count = read_header(path, hint)
    dtype = _CODES[_NAMES[name]]
    if count == 0:
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))
