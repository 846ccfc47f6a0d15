#!/usr/bin/env python
"""Train a lossless SentencePiece tokenizer (for tokenizer-type SPMTokenizer).

    python tools/train_tokenizer.py --input corpus/*.txt --model-prefix data/tok/spm8000 --vocab-size 8000

writes MODEL_PREFIX.model / .vocab (an existing model is kept unless --overwrite). Settings: identity
normalisation, whitespace kept as is, no dummy prefix, byte fallback, so decode(encode(text)) == text; eos
(id 3) is the end-of-document token.
Inputs: plain text files, or .jsonl[.gz] (text under --jsonl-key).
"""

from __future__ import annotations

import argparse
import glob
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="input files or glob patterns")
    p.add_argument("--model-prefix", required=True, help="writes MODEL_PREFIX.model and .vocab")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    p.add_argument("--jsonl-key", default="text")
    p.add_argument("--overwrite", action="store_true", help="replace an existing MODEL_PREFIX.model / .vocab")
    args = p.parse_args(argv)
    if not args.overwrite:
        for suffix in (".model", ".vocab"):
            if Path(args.model_prefix + suffix).exists():
                print(
                    f"error: {args.model_prefix + suffix}: output exists; pass --overwrite to replace it",
                    file=sys.stderr,
                )
                return 2
    from neox_l2e.data import DataError, SPMTokenizer, train_sentencepiece
    from neox_l2e.data.preprocess import iter_documents

    inputs = []
    for pattern in args.input:
        inputs += sorted(glob.glob(pattern)) or [pattern]
    t0 = time.time()
    try:
        model = train_sentencepiece(
            iter_documents(inputs, args.jsonl_key),
            args.model_prefix,
            vocab_size=args.vocab_size,
            model_type=args.model_type,
        )
        tok = SPMTokenizer(model)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {model}: vocab {tok.vocab_size}, eod id {tok.eod} ({time.time() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
