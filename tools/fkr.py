#!/usr/bin/env python
"""False Killing Rate per layer over a list of k (the method page, section 5), both readings of tau_k.

A kill is a (token, neuron) with phi >= tau_k; a false kill hits a token whose label is not the neuron's
relatively monosemantic feature l* (the label with the highest mean phi). tau_k readings:
    per-token   (the default reading) the K-th largest phi among the token's neurons, K = round(k% x neurons)
    global      the K-th largest phi over all (token, neuron) pairs of the layer, K = round(k% x neurons x tokens)
Same streaming activation code as tools/ms_scan.py (neox_l2e.analysis.scan).

    python tools/fkr.py path/to/checkpoint --data data/labelled/code_en.jsonl --k 0.5,1,2,3,5 --out runs/fkr
Writes OUT/fkr.json, OUT/fkr.md and OUT/fkr.png; prints the tables.
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
    add_model_args(p)
    add_data_args(p)
    add_scan_args(p)
    p.add_argument("--out", default="runs/fkr", help="output folder (default runs/fkr)")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    from neox_l2e.analysis.report import fkr_table, write_json

    opts = scan_options(args, neuron_sample=1, ks_tokens=0, compute_ks=False)
    (r,) = scan_checkpoints(args, opts)
    os.makedirs(args.out, exist_ok=True)
    report = {
        "model": r.name,
        "path": r.path,
        "num_parameters": r.num_parameters,
        "data": args.data,
        "labels": r.label_names,
        "tokens_per_label": r.tokens_per_label,
        "k_percent": [float(k) for k in opts.fkr_ks],
        "default_mode": opts.fkr_modes[0],
        "layers": [
            {
                "layer": l.layer,
                "num_neurons": l.num_neurons,
                "fkr": {m: {str(k): v for k, v in d.items()} for m, d in l.fkr.items()},
                "kills": {m: {str(k): v for k, v in d.items()} for m, d in l.kills.items()},
                "tau_global": {str(k): v for k, v in l.tau.items()},
            }
            for l in r.layers
        ],
    }
    files = [str(write_json(report, os.path.join(args.out, "fkr.json")))]
    lines = []
    for mode in opts.fkr_modes:
        lines += fkr_table([r], mode) + [""]
    with open(os.path.join(args.out, "fkr.md"), "w") as f:
        f.write("\n".join(lines))
    files.append(os.path.join(args.out, "fkr.md"))
    if not args.no_plot:
        from neox_l2e.analysis.plots import plot_fkr

        files.append(str(plot_fkr([r], os.path.join(args.out, "fkr.png"), opts.fkr_modes)))
    print("\n".join(lines))
    print(f"wrote {', '.join(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
