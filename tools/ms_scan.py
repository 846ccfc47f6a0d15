#!/usr/bin/env python
"""Monosemanticity scan of MLP neurons across models and layers (the method page, section 6).

For each checkpoint (ours, or a Hugging Face GPTNeoX/Pythia folder) and a labelled jsonl dataset: per layer and
neuron phi_l and phi_-l, l*, the K-S statistic of the sampled neurons, the layer-wise mean phi_l* over a seeded
random neuron sample (paper: 1,000), and FKR curves over k. Streaming: two passes over the data, per-label
sums of phi; memory does not grow with the dataset. GPU when present (bf16), CPU otherwise.

Writes OUT/report.json, OUT/layers.csv, OUT/neurons.csv, OUT/fkr.md and OUT/{layerwise_phi,ks,histograms,fkr}.png.

    python tools/build_labelled_dataset.py data/labelled/code_en.jsonl
    python tools/ms_scan.py 70m=path/to/pythia-70m 410m=path/to/pythia-410m \\
        --data data/labelled/code_en.jsonl --out runs/ms_scan
"""

from __future__ import annotations

import os
import sys

from neox_l2e.analysis.cli import (
    add_data_args,
    add_model_args,
    add_scan_args,
    parser,
    run_main,  # noqa: E402
    scan_checkpoints,
    scan_options,
)


def main(argv):
    p = parser(__doc__)
    add_model_args(p, many=True)
    add_data_args(p)
    add_scan_args(p)
    p.add_argument(
        "--neuron-sample", type=int, default=1000, help="random neurons per layer (default 1000, the paper's)"
    )
    p.add_argument("--ks-tokens", type=int, default=4000, help="token subsample for the K-S test (default 4000)")
    p.add_argument("--no-ks", action="store_true", help="skip the K-S test")
    p.add_argument("--out", default="runs/ms_scan", help="output folder (default runs/ms_scan)")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    from neox_l2e.analysis.report import fkr_table, write_scan_report

    opts = scan_options(args, args.neuron_sample, args.ks_tokens, not args.no_ks)
    results = scan_checkpoints(args, opts)
    files = write_scan_report(results, args.out, extra={"data": args.data})
    lines = []
    for mode in opts.fkr_modes:
        lines += fkr_table(results, mode) + [""]
    with open(os.path.join(args.out, "fkr.md"), "w") as f:
        f.write("\n".join(lines))
    if not args.no_plots:
        from neox_l2e.analysis.plots import plot_all

        files.update(plot_all(results, args.out))
    print("| model | layer | mean phi_l* | mean phi_-l* | mean K-S | FKR@2% per-token |")
    print("|---|---|---|---|---|---|")
    for r in results:
        for l in r.layers:
            s = l.summary(r.label_names)
            ks = s.get("mean_ks_stat_sample")
            f2 = l.fkr.get("per-token", {}).get(2.0)
            print(
                f"| {r.name} | {l.layer} | {s['mean_phi_lstar_sample']:.3f} | {s['mean_phi_not_lstar_sample']:.3f} | "
                f"{'-' if ks is None else f'{ks:.3f}'} | {'-' if f2 is None else f'{100 * f2:.1f}%'} |"
            )
    print(f"wrote {', '.join(files.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
