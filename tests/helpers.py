"""Shared test utilities: config composition and tiny corpora written by the tests themselves."""
from __future__ import annotations

import random
from pathlib import Path

from sparse_llm.config import CONF_DIR, compose_config  # noqa: F401  (re-exported for the tests)

REPO = Path(__file__).resolve().parent.parent

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex bold jackals "
         "sparse models learn to keep few units active per token and the kernels skip the rest").split()


def write_text_corpus(directory: Path, documents: int = 200, seed: int = 0) -> list[Path]:
    """A few small text files of pseudo-sentences (deterministic)."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for file_index in range(4):
        lines = []
        for _ in range(documents // 4):
            sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30)))
            lines.append(sentence.capitalize() + ".\n")
        path = directory / f"part{file_index}.txt"
        path.write_text("\n".join(lines))
        paths.append(path)
    return paths
