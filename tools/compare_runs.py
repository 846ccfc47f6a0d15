#!/usr/bin/env python
"""Two or more training runs side by side (baseline vs L2E): loss curves, learning rate, L2E metrics and eval
scores in one PNG, and a markdown table.

A run is a folder holding metrics.jsonl (runs/<name>/) or the metrics.jsonl file itself; NAME=PATH names it.
Eval scores come from tools/evaluate.py JSON files in the run folder (eval*.json, eval/*.json) or from
--eval NAME=FILE; a file holding several models gives each run the results of the model with the run's name
(evaluate.py's NAME=CHECKPOINT), a file of one model gives that model's.

    python tools/compare_runs.py runs/baseline runs/l2e-2pct --out runs/compare
    python tools/compare_runs.py base=runs/baseline l2e=runs/l2e --eval l2e=runs/eval/l2e.json
Writes OUT.png and OUT.md; prints the table.
"""

from __future__ import annotations

import sys

from neox_l2e.analysis.cli import parser, run_main, split_named  # noqa: E402


def main(argv):
    p = parser(__doc__)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folder or metrics.jsonl; NAME=PATH")
    p.add_argument("--eval", action="append", default=[], metavar="NAME=FILE", help="tools/evaluate.py JSON for a run")
    p.add_argument(
        "--l2e-metrics",
        default="heldout/frac_phi_gt_5,heldout/kurtosis_median,frac_selected",
        help="metrics to plot and tabulate, mean over layers: heldout/NAME = ms_heldout/ (fixed held-out set, "
        "baseline included), NAME = l2e_train/ (running statistics) (default "
        "heldout/frac_phi_gt_5,heldout/kurtosis_median,frac_selected)",
    )
    p.add_argument("--out", default="runs/compare", help="output path without extension (default runs/compare)")
    args = p.parse_args(argv)
    from pathlib import Path

    from neox_l2e.analysis.common import AnalysisError
    from neox_l2e.analysis.runs import plot_runs, read_eval_file, read_run, select_evals, summary_table

    runs = []
    for spec in args.runs:
        name, path = split_named(spec)
        runs.append(read_run(path, name))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise AnalysisError(f"two runs share a name ({names}); name them NAME=PATH")
    for spec in args.eval:
        if "=" not in spec:
            raise AnalysisError(f"--eval {spec!r}: expected NAME=FILE")
        name, f = spec.split("=", 1)
        match = [r for r in runs if r.name == name]
        if not match:
            raise AnalysisError(f"--eval {spec!r}: no run named {name!r} (runs: {', '.join(names)})")
        match[0].evals += select_evals(read_eval_file(f), name, f)
    metrics = tuple(m.strip() for m in args.l2e_metrics.split(",") if m.strip())
    out = Path(args.out)
    png = plot_runs(runs, out.with_suffix(".png"), metrics)
    lines = summary_table(runs, metrics)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    for r in runs:
        if r.skipped_lines:
            print(f"note: {r.name}: skipped {r.skipped_lines} unreadable line(s)", file=sys.stderr)
    print(f"wrote {png}, {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
