#!/usr/bin/env python
"""Prepare the default Shakespeare corpus (tokenizer + train/valid .bin/.idx); reused when already there.

python tools/prepare_corpus.py [--root data/shakespeare] [--vocab-size 8000] [--force]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=str(ROOT / "data/shakespeare"))
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--force", action="store_true", help="rebuild even if prepared")
    args = p.parse_args(argv)
    from neox_l2e.data import DataError, prepare_default_corpus

    try:
        paths = prepare_default_corpus(args.root, vocab_size=args.vocab_size, force=args.force)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for k, v in paths.items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
