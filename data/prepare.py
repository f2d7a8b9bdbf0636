#!/usr/bin/env python
"""Prepare token shards for sparse_llm: `python data/prepare.py --help` (see data/README.md)."""

import sys
from pathlib import Path

try:
    from sparse_llm.data.prepare import main
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from sparse_llm.data.prepare import main

if __name__ == "__main__":
    sys.exit(main())
