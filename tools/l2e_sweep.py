#!/usr/bin/env python
"""Train the same config at several L2E loss weights (lambda) and compare them: validation loss and the
L2E metrics of the inhibited layers. lambda = 0 is the baseline: the inhibitors still score, select and
log (so the phi fractions are measured the same way), but the loss adds nothing to the gradients, so the
model trains exactly as without L2E.

    python tools/l2e_sweep.py                                   # the demo config on the default corpus
    python tools/l2e_sweep.py --lambdas 0,0.01,0.1 --out runs/sweep train-iters=200 l2e-decay=0.99

Each run goes to OUT/lambda_<value>/ (metrics.jsonl, train.log); OUT/sweep.md, sweep.json and sweep.png
hold the comparison. The phi fractions and the selected fraction are the means over the inhibited
layers and over the last --tail of the logged windows; the validation loss is the last evaluation.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]

METRICS = ("frac_selected", "frac_phi_gt_5", "frac_phi_gt_10", "frac_phi_gt_25", "phi_mean_all", "tau")


def corpus_overrides(data_root, vocab_size: int = 8000) -> Dict[str, object]:
    """The default corpus (prepared once under data_root) as config overrides."""
    from neox_l2e.data import prepare_default_corpus

    corpus = prepare_default_corpus(root=data_root, vocab_size=vocab_size)
    tok = str(corpus["tokenizer"])
    return {
        "train_data_paths": [str(corpus["train_prefix"])],
        "valid_data_paths": [str(corpus["valid_prefix"])],
        "vocab_file": tok,
        "tokenizer_type": "HFTokenizer" if tok.endswith(".json") else "SPMTokenizer",
    }


def _arg(key: str, value) -> str:
    return f"{key}={json.dumps(value)}"


def train_one(configs: Sequence[str], overrides: Dict[str, object], out: Path, save: Optional[Path] = None) -> None:
    """train.py in a subprocess (a fresh process per run: nothing carries over between runs). ``save``: where the
    run keeps its checkpoints (None: it keeps none)."""
    out.mkdir(parents=True, exist_ok=True)
    args = dict(overrides, log_dir=str(out), save=str(save) if save is not None else None)
    cmd = [sys.executable, str(ROOT / "train.py"), *configs, *(_arg(k, v) for k, v in args.items())]
    with open(out / "train.log", "w") as log:
        r = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if r.returncode != 0:
        tail = (out / "train.log").read_text().strip().splitlines()[-1:]
        raise RuntimeError(
            f"{out}: training failed (exit {r.returncode}): {tail[0] if tail else ''} (whole log: {out / 'train.log'})"
        )


def summarize(run_dir: Path, lam: float, tail: float) -> dict:
    from neox_l2e.analysis.runs import layer_mean, read_run, tail_mean

    run = read_run(run_dir, name=f"lambda={lam:g}")
    row = {
        "lambda": lam,
        "valid_loss": run.valid_loss[1][-1] if run.valid_loss[1] else None,
        "train_loss": tail_mean(run.train_loss, tail),
        "layers": sorted({l for k, m in run.l2e.items() if not k.startswith("heldout/") for l in m}),  # inhibited
    }
    for m in METRICS:
        row[m] = tail_mean(layer_mean(run, m), tail)
    return row


def sweep(
    configs: Sequence[str],
    lambdas: Sequence[float],
    out,
    overrides: Optional[dict] = None,
    tail: float = 0.25,
    log=print,
) -> List[dict]:
    """Train one run per lambda (baseline first) and return one summary row per run."""
    out = Path(out)
    rows = []
    for lam in lambdas:
        run_dir = out / f"lambda_{lam:g}"
        t0 = time.time()
        train_one(configs, dict(overrides or {}, l2e_enabled=True, l2e_lambda=float(lam)), run_dir)
        rows.append(summarize(run_dir, lam, tail))
        vl = rows[-1]["valid_loss"]
        log(f"lambda={lam:g}: valid loss {'-' if vl is None else format(vl, '.4f')} ({time.time() - t0:.0f} s)")
    return rows


def relative(rows: List[dict]) -> List[dict]:
    """Add each row's change against the lambda = 0 row (valid loss in %, phi fractions as ratios)."""
    base = next((r for r in rows if r["lambda"] == 0), None)
    for r in rows:
        if base is None:
            continue
        if r["valid_loss"] is not None and base["valid_loss"]:
            r["valid_loss_change_pct"] = 100.0 * (r["valid_loss"] - base["valid_loss"]) / base["valid_loss"]
        for m in METRICS[1:4]:
            if r[m] is not None and base[m]:
                r[f"{m}_ratio"] = r[m] / base[m]
    return rows


def table(rows: List[dict]) -> List[str]:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    head = ["lambda", "valid loss", "vs lambda=0", "frac selected", "phi>5", "phi>10", "phi>25", "mean phi", "tau"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for r in rows:
        lines.append(
            "| "
            + " | ".join(
                [
                    f"{r['lambda']:g}",
                    f(r["valid_loss"], ".4f"),
                    f(r.get("valid_loss_change_pct"), "+.2f") + " %",
                    f(r["frac_selected"], ".4f"),
                    *(
                        f(r[m], ".2e") + (f" ({r[m + '_ratio']:.2g}x)" if r.get(m + "_ratio") is not None else "")
                        for m in METRICS[1:4]
                    ),
                    f(r["phi_mean_all"], ".3f"),
                    f(r["tau"], ".3g"),
                ]
            )
            + " |"
        )
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="key=value config overrides (all runs)")
    p.add_argument(
        "--config",
        nargs="+",
        metavar="YML",
        default=[str(ROOT / "configs/local/demo.yml")],
        help="yml files merged in order, as train.py does; each run overrides l2e-enabled=true and its "
        "l2e-lambda, the other L2E keys come from the files (default: configs/local/demo.yml, "
        "with the L2E defaults mid2, p = 2%%)",
    )
    p.add_argument("--lambdas", default="0,0.01,0.03,0.1,0.3,1", help="comma-separated; include 0 (the baseline)")
    p.add_argument(
        "--out",
        default=str(ROOT / "runs/lambda-sweep"),
        help="sweep folder: one run folder per lambda, sweep.json, the comparison table and plots "
        "(default: runs/lambda-sweep)",
    )
    p.add_argument("--data-root", default=str(ROOT / "data/shakespeare"), help="where the default corpus is prepared")
    p.add_argument("--no-corpus", action="store_true", help="use the data paths of the configs as they are")
    p.add_argument("--tail", type=float, default=0.25, help="fraction of the last logged windows averaged")
    args = p.parse_args(argv)
    # `--config a.yml key=value`: the nargs="+" option also takes the overrides that follow it
    args.overrides = [c for c in args.config if "=" in c] + args.overrides
    args.config = [c for c in args.config if "=" not in c] or p.get_default("config")
    from neox_l2e.analysis.runs import plot_runs, read_run
    from neox_l2e.config import ConfigError, parse_override

    try:
        lambdas = [float(x) for x in args.lambdas.split(",") if x.strip()]
    except ValueError:
        p.error(f"--lambdas: expected comma-separated numbers, got {args.lambdas!r}")
    try:
        overrides = {} if args.no_corpus else corpus_overrides(args.data_root)
        overrides.update(dict(parse_override(o) for o in args.overrides))
        rows = relative(sweep(args.config, lambdas, args.out, overrides, args.tail))
    except (ConfigError, RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    lines = table(rows)
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    (out / "sweep.json").write_text(
        json.dumps({"configs": args.config, "overrides": args.overrides, "tail": args.tail, "rows": rows}, indent=2)
    )
    runs = [read_run(out / f"lambda_{r['lambda']:g}", name=f"lambda={r['lambda']:g}") for r in rows]
    plot_runs(runs, out / "sweep.png", l2e_metrics=("frac_phi_gt_5", "frac_phi_gt_10"))
    print("\n".join(lines))
    print(f"wrote {out}/sweep.md, sweep.json, sweep.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
