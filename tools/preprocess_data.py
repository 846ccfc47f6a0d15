#!/usr/bin/env python
"""Tokenize jsonl / plain text into a Megatron/GPT-NeoX mmap indexed dataset.

    python tools/preprocess_data.py --input data/raw/*.jsonl --output-prefix data/mycorpus \\
        --tokenizer-type SPMTokenizer --vocab-file data/shakespeare/tokenizer/spm8000.model --workers 2

writes data/mycorpus_text_document.bin/.idx (NeoX's naming: PREFIX_<jsonl key>_document). Inputs: .jsonl
(text under --jsonl-keys, default "text"; .jsonl.gz too) or plain text files (one document per file).
Several keys (--jsonl-keys text title) write one dataset per key (PREFIX_text_document,
PREFIX_title_document), in one pass; every jsonl line must then have every key, and plain text inputs
are refused. The EOD token is appended to every document; tokens are uint16 when the vocabulary is below
65500, else int32. Existing output is kept unless --overwrite (checked for every key before any work);
outputs are written under temporary names and renamed at the end, so an error leaves nothing behind.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="input files or glob patterns (.jsonl[.gz] or text)")
    p.add_argument("--output-prefix", required=True, help="output PREFIX (writes PREFIX_<key>_document.bin/.idx)")
    p.add_argument(
        "--jsonl-keys",
        "--jsonl-key",
        dest="jsonl_keys",
        nargs="+",
        default=["text"],
        help="JSON field(s) holding the text; one output dataset per key",
    )
    p.add_argument(
        "--tokenizer-type",
        default=None,
        choices=["HFTokenizer", "SPMTokenizer"],
        help="default: HFTokenizer for a .json vocab file, else SPMTokenizer",
    )
    p.add_argument("--vocab-file", required=True, help="SentencePiece .model or tokenizers .json")
    p.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 1), help="tokenizer processes")
    p.add_argument("--overwrite", action="store_true", help="replace existing output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from neox_l2e.data import DataError
    from neox_l2e.data.preprocess import preprocess
    from neox_l2e.data.tokenizer import infer_tokenizer_type

    inputs = []
    for pattern in args.input:
        matches = sorted(glob.glob(pattern))
        inputs += matches if matches else [pattern]  # a missing file is reported by preprocess
    try:
        r = preprocess(
            inputs,
            args.output_prefix,
            args.tokenizer_type or infer_tokenizer_type(args.vocab_file),
            args.vocab_file,
            json_keys=args.jsonl_keys,
            workers=args.workers,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for key, prefix in r["prefixes"].items():
        print(f"wrote {prefix}.bin/.idx: {r['documents']:,} documents, {r['tokens_by_key'][key]:,} tokens")
    print(f"{r['tokens']:,} tokens in {r['seconds']:.1f} s ({r['tokens_per_s']:,.0f} tokens/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
