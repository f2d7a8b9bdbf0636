"""Data layer: token shards + manifest, sentencepiece tokenizer, prepare, default corpus, loader."""

from .default_corpus import DEFAULT_ROOT, ensure_default_corpus
from .loader import TokenLoader
from .manifest import Manifest, load_manifest
from .prepare import prepare_corpus
from .shards import DataError, open_shard, write_shard
from .tokenizer import Tokenizer, train_tokenizer

__all__ = [
    "DEFAULT_ROOT",
    "DataError",
    "Manifest",
    "TokenLoader",
    "Tokenizer",
    "ensure_default_corpus",
    "load_manifest",
    "open_shard",
    "prepare_corpus",
    "train_tokenizer",
    "write_shard",
]
