"""SentencePiece tokenizer: training (BPE, byte fallback, lossless) and a thin wrapper."""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

from .manifest import sha256_file
from .shards import DataError, atomic_write_bytes

# Special ids of the models we train: unk=0, bos=1, eos=2 (sentencepiece's defaults), no pad.
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2


class Tokenizer:
    """Any sentencepiece model file. `encode` adds no BOS/EOS; documents get EOS from prepare."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(
                f"tokenizer model {self.path} not found; pass an existing sentencepiece .model file "
                "or let prepare train one"
            )
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(str(self.path))
        except (OSError, RuntimeError) as e:
            raise DataError(
                f"{self.path} is not a sentencepiece model ({e}); pass a .model file written by sentencepiece"
            ) from None
        self.sha256 = sha256_file(self.path)

    @property
    def vocab_size(self) -> int:
        return int(self._sp.GetPieceSize())

    @property
    def eos_id(self) -> int:
        return int(self._sp.eos_id())

    @property
    def bos_id(self) -> int:
        return int(self._sp.bos_id())

    def encode(self, text: str) -> list[int]:
        return self._sp.EncodeAsIds(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.EncodeAsIds(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.DecodeIds([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.IdToPiece(int(i))

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def train_tokenizer(
    text_files: Sequence[str | os.PathLike],
    model_prefix: str | os.PathLike,
    vocab_size: int,
    *,
    max_sentences: int = 400_000,
    threads: int = 4,
    seed: int = 0,
) -> Path:
    """Train a sentencepiece BPE model on lines of `text_files`; returns `<model_prefix>.model`.

    Lossless: identity normalization, whitespace kept as is, byte fallback for any character
    outside the vocab (newlines and tabs become byte pieces). `max_sentences` lines are sampled
    (seeded) to bound training time; `vocab_size` is a soft limit for tiny corpora. `threads` is
    recorded in the model file, hence a fixed default rather than the machine's core count."""
    files = [str(Path(f)) for f in text_files]
    if not files:
        raise DataError("train_tokenizer needs at least one text file")
    for f in files:
        if not Path(f).is_file():
            raise DataError(f"tokenizer training input {f} not found")
    if vocab_size < 260:
        raise DataError(f"vocab_size {vocab_size} is too small: byte fallback alone needs 259 ids; use >= 260")
    prefix = Path(model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)

    def lines() -> Iterator[str]:
        for f in files:
            with open(f, encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    line = line.rstrip("\n")
                    if line.strip():
                        yield line

    # Lines in and bytes out through Python: the model then records no file paths, so the same
    # text gives a byte-identical model (and sha256) wherever it is trained.
    def train(coverage: float) -> bytes:
        model = io.BytesIO()
        spm.SetRandomGeneratorSeed(seed)
        spm.SentencePieceTrainer.Train(
            sentence_iterator=lines(),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            byte_fallback=True,
            character_coverage=coverage,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            max_sentence_length=16384,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            num_threads=threads,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=-1,
            minloglevel=2,
        )
        return model.getvalue()

    # Small vocabs cannot hold every character beside the 256 byte pieces: cover fewer
    # characters (the rest falls back to bytes) until they fit.
    coverages = [0.9995, 0.995, 0.98, 0.95, 0.9, 0.8, 0.6]
    for i, coverage in enumerate(coverages):
        try:
            data = train(coverage)
            break
        except RuntimeError as e:
            if "required_chars" not in str(e) or i == len(coverages) - 1:
                raise DataError(f"tokenizer training failed: {e}") from None
    path = Path(f"{prefix}.model")
    atomic_write_bytes(path, [data])
    return path
