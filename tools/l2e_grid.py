#!/usr/bin/env python
"""The paper's experiment grid in one command: baseline, L2E p in {1, 2, 3}% x {mid2, mid-third, top-bot} and
MEmeL p in {1, 2, 3}% (mid2) on one config, for several seeds, then one report.

    python tools/l2e_grid.py --seeds 1,2,3 --out runs/grid                 # the demo config, default corpus
    python tools/l2e_grid.py --grid small --seeds 1,2 train-iters=100      # baseline, l2e-2pct-mid2, memel-2pct-mid2
    python tools/l2e_grid.py --only 'baseline,l2e-*-mid2' --seeds 1,2,3    # names or shell-style patterns
    python tools/l2e_grid.py --config my-model.yml my-data.yml --no-corpus --seeds 1,2,3 --out runs/grid-70m
    python tools/l2e_grid.py --report-only --out runs/grid                 # rebuild the report from what is there

Every run trains in its own process (train.py) into OUT/<name>/seed<s>/ (metrics.jsonl, train.log) and leaves a
done.json when it finishes. The grid is resumable: a run whose done.json records the same settings is skipped;
a run that failed or was interrupted is started again. Progress and an ETA (from the runs finished so far) are
printed before each run. Each run keeps its checkpoints in OUT/<name>/seed<s>/checkpoints (as many as the
config's keep-last-n-checkpoints; the last one is the end of training).

The report (OUT/report.md, report.json, and the figures phi_distribution.png, heldout_over_training.png) gives,
per grid entry, mean and spread (sample standard deviation) over the seeds of: the last validation loss and its
change against the baseline of the same seed; the mean training step time and its overhead against the
baseline of the same seed (the first logged window, with the warm-up step, is left out; on a shared machine
this is noisy); held-out monosemanticity (ms_heldout/..., neox_l2e.l2e.heldout: phi of Eq. 1 on a fixed held-out
set with statistics fresh on it) of the entry's inhibited layers next to the baseline's on the same layers,
and per layer. The figures: the held-out phi distribution per layer (exceedance P(phi > x), seeds pooled) at
the last evaluation, baseline against every entry; held-out phi > 5 over training per layer. Downstream eval
tasks are not run here: use tools/evaluate.py on a run's checkpoints.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]

PCTS = (1, 2, 3)
LAYER_SETS = ("mid2", "mid-third", "top-bot")
SMALL = ("baseline", "l2e-2pct-mid2", "memel-2pct-mid2")


class GridError(ValueError):
    """A user error of this tool (one line)."""


def grid_entries() -> Dict[str, dict]:
    """name -> config overrides of every entry of the paper's grid, in report order."""
    out = {"baseline": {"l2e_enabled": False}}
    for p in PCTS:
        for layers in LAYER_SETS:
            out[f"l2e-{p}pct-{layers}"] = {
                "l2e_enabled": True,
                "l2e_method": "l2e",
                "l2e_layers": layers,
                "l2e_ratio": p / 100.0,
            }
    for p in PCTS:
        out[f"memel-{p}pct-mid2"] = {
            "l2e_enabled": True,
            "l2e_method": "memel",
            "l2e_layers": "mid2",
            "l2e_ratio": p / 100.0,
        }
    return out


def select_entries(grid: str, only: Optional[str]) -> Dict[str, dict]:
    """The entries of --grid (full / small), narrowed by --only (comma-separated names or patterns)."""
    entries = grid_entries()
    if grid == "small":
        entries = {k: v for k, v in entries.items() if k in SMALL}
    elif grid != "full":
        raise GridError(f"--grid {grid!r}: use full or small")
    if only:
        pats = [p.strip() for p in only.split(",") if p.strip()]
        for p in pats:
            if not any(fnmatch.fnmatchcase(k, p) for k in entries):
                raise GridError(f"--only {p!r} matches no grid entry (entries: {', '.join(entries)})")
        entries = {k: v for k, v in entries.items() if any(fnmatch.fnmatchcase(k, p) for p in pats)}
    return entries


def fmt_time(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}"


# ------------------------------------------------------------------------------------------------
# running


def run_grid(
    configs: Sequence[str],
    entries: Dict[str, dict],
    seeds: Sequence[int],
    out: Path,
    overrides: Dict[str, object],
    log=print,
) -> List[dict]:
    """Train every (entry, seed) not finished yet; returns [{name, seed, dir, status, time_s}] in grid order."""
    from l2e_sweep import train_one

    jobs = [(name, seed) for name in entries for seed in seeds]
    done_times: List[float] = []
    records = []
    todo = []
    for name, seed in jobs:
        d = out / name / f"seed{seed}"
        settings = {"configs": [str(c) for c in configs], "overrides": {**overrides, **entries[name], "seed": seed}}
        marker = d / "done.json"
        if marker.is_file():
            try:
                prev = json.loads(marker.read_text())
            except (OSError, json.JSONDecodeError):
                prev = {}
            if prev.get("settings") == json.loads(json.dumps(settings)):
                records.append(
                    {"name": name, "seed": seed, "dir": str(d), "status": "skipped", "time_s": prev.get("time_s")}
                )
                if prev.get("time_s"):
                    done_times.append(float(prev["time_s"]))
                continue
        todo.append((name, seed, d, settings))
    skipped = len(jobs) - len(todo)
    log(
        f"grid: {len(entries)} entries x {len(seeds)} seeds = {len(jobs)} runs; {skipped} finished already "
        f"(skipped), {len(todo)} to run, into {out}"
    )
    t_start = time.time()
    for k, (name, seed, d, settings) in enumerate(todo):
        mean_t = sum(done_times) / len(done_times) if done_times else float("nan")
        log(
            f"[{skipped + k + 1}/{len(jobs)}] {name} seed {seed} ... "
            f"(elapsed {fmt_time(time.time() - t_start)}, ETA {fmt_time(mean_t * (len(todo) - k))})"
        )
        if d.exists():
            shutil.rmtree(d)  # an unfinished or differently-configured run starts over
        t0 = time.time()
        train_one(configs, settings["overrides"], d, save=d / "checkpoints")
        dt = time.time() - t0
        done_times.append(dt)
        (d / "done.json").write_text(json.dumps({"settings": settings, "time_s": dt}, indent=2))
        records.append({"name": name, "seed": seed, "dir": str(d), "status": "ran", "time_s": dt})
        log(f"    done in {dt:.0f} s")
    order = {(n, s): i for i, (n, s) in enumerate(jobs)}
    return sorted(records, key=lambda r: order[(r["name"], r["seed"])])


# ------------------------------------------------------------------------------------------------
# reading and aggregating


def _step_time(metrics_file: Path) -> Optional[float]:
    """Mean of the logged windows' step_time_s, the first window (the untimed warm-up step) left out."""
    times = []
    for line in metrics_file.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(r, dict) and r.get("kind") == "train" and isinstance(r.get("step_time_s"), (int, float)):
            times.append(float(r["step_time_s"]))
    times = times[1:] if len(times) > 1 else times
    return sum(times) / len(times) if times else None


def read_one(d: Path) -> dict:
    """One finished run: valid loss, step time, inhibited layers, last held-out metrics per layer, histograms,
    held-out series over training."""
    from neox_l2e.analysis.runs import read_run

    run = read_run(d)
    last = {}
    for metric, by_layer in run.heldout.items():
        for layer, (_xs, ys) in by_layer.items():
            if ys:
                last.setdefault(layer, {})[metric] = ys[-1]
    return {
        "valid_loss": run.valid_loss[1][-1] if run.valid_loss[1] else None,
        "step_time_s": _step_time(d / "metrics.jsonl"),
        "inhibited": run.inhibited_layers,
        "heldout": last,
        "hist": run.heldout_hist,
        "series": {layer: xs_ys for layer, xs_ys in run.heldout.get("frac_phi_gt_5", {}).items()},
    }


def _mean_sd(vals: Sequence[Optional[float]]) -> tuple:
    v = [x for x in vals if x is not None and math.isfinite(x)]
    if not v:
        return None, None, 0
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else None
    return m, sd, len(v)


def aggregate(
    runs: Dict[str, Dict[int, dict]], entries: Dict[str, dict], num_layers: int, reference_layers: Dict[str, List[int]]
) -> List[dict]:
    """One row per entry: mean / sd over seeds, paired differences against the baseline of the same seed."""
    base = runs.get("baseline", {})
    rows = []
    for name in entries:
        per_seed = runs.get(name, {})
        if not per_seed:
            continue
        layers = reference_layers[name]
        row = {"name": name, "seeds": sorted(per_seed), "layers": layers}

        def collect(fn, against_base=False, per_seed=per_seed):
            vals = []
            for s, r in per_seed.items():
                b = base.get(s)
                if against_base and b is None:
                    continue
                try:
                    vals.append(fn(r, b))
                except (KeyError, TypeError, ZeroDivisionError):
                    vals.append(None)
            return _mean_sd(vals)

        def inhibited_mean(r, metric, layers=layers):
            vs = [r["heldout"][i][metric] for i in layers]
            return sum(vs) / len(vs)

        row["valid_loss"] = collect(lambda r, b: r["valid_loss"])
        row["valid_change_pct"] = collect(lambda r, b: 100.0 * (r["valid_loss"] / b["valid_loss"] - 1), True)
        row["step_time_s"] = collect(lambda r, b: r["step_time_s"])
        row["overhead_pct"] = collect(lambda r, b: 100.0 * (r["step_time_s"] / b["step_time_s"] - 1), True)
        for metric in ("frac_phi_gt_5", "frac_phi_gt_25", "kurtosis_median", "max_phi_median", "var_ratio_median"):
            row[f"inh_{metric}"] = collect(lambda r, b, m=metric: inhibited_mean(r, m))
            row[f"base_{metric}"] = collect(lambda r, b, m=metric: inhibited_mean(b, m), True)
        row["per_layer"] = {}
        for layer in range(num_layers):
            row["per_layer"][layer] = {
                m: collect(lambda r, b, m=m, i=layer: r["heldout"][i][m]) for m in ("frac_phi_gt_5", "kurtosis_median")
            }
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------
# the report


def _ms(t: tuple, fmt: str, scale: float = 1.0) -> str:
    m, sd, n = t
    if m is None:
        return "-"
    s = format(m * scale, fmt)
    return s + (f" ± {format(sd * scale, fmt.lstrip('+'))}" if sd is not None else "")


def report_tables(rows: List[dict], num_layers: int) -> List[str]:
    lines = [
        "| entry | layers | seeds | valid loss | vs baseline | step time (ms) | overhead | "
        "held-out phi>5, its layers | baseline, same layers | held-out kurtosis med. | baseline | "
        "var held-out / running |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            "| "
            + " | ".join(
                [
                    r["name"],
                    ",".join(map(str, r["layers"]))
                    if r["name"] != "baseline"
                    else "(" + ",".join(map(str, r["layers"])) + ")",
                    str(len(r["seeds"])),
                    _ms(r["valid_loss"], ".4f"),
                    _ms(r["valid_change_pct"], "+.2f") + " %" if r["name"] != "baseline" else "",
                    _ms(r["step_time_s"], ".0f", 1000.0),
                    _ms(r["overhead_pct"], "+.1f") + " %" if r["name"] != "baseline" else "",
                    _ms(r["inh_frac_phi_gt_5"], ".3e"),
                    _ms(r["base_frac_phi_gt_5"], ".3e") if r["name"] != "baseline" else "",
                    _ms(r["inh_kurtosis_median"], ".3f"),
                    _ms(r["base_kurtosis_median"], ".3f") if r["name"] != "baseline" else "",
                    _ms(r["inh_var_ratio_median"], ".3f"),
                ]
            )
            + " |"
        )
    lines += [
        "",
        "Held-out phi > 5 per layer (`ms_heldout/layer<i>/frac_phi_gt_5`, last evaluation; * = inhibited "
        "by that entry):",
        "",
        "| entry | " + " | ".join(f"layer {i}" for i in range(num_layers)) + " |",
        "|---|" + "---:|" * num_layers,
    ]
    for r in rows:
        inh = set(r["layers"]) if r["name"] != "baseline" else set()
        lines.append(
            "| "
            + r["name"]
            + " | "
            + " | ".join(
                _ms(r["per_layer"][i]["frac_phi_gt_5"], ".3e") + (" *" if i in inh else "") for i in range(num_layers)
            )
            + " |"
        )
    lines += [
        "",
        "Held-out median per-neuron kurtosis per layer (`ms_heldout/layer<i>/kurtosis_median`):",
        "",
        "| entry | " + " | ".join(f"layer {i}" for i in range(num_layers)) + " |",
        "|---|" + "---:|" * num_layers,
    ]
    for r in rows:
        inh = set(r["layers"]) if r["name"] != "baseline" else set()
        lines.append(
            "| "
            + r["name"]
            + " | "
            + " | ".join(
                _ms(r["per_layer"][i]["kurtosis_median"], ".3f") + (" *" if i in inh else "") for i in range(num_layers)
            )
            + " |"
        )
    return lines


def plot_figures(
    runs: Dict[str, Dict[int, dict]],
    entries: Dict[str, dict],
    reference_layers: Dict[str, List[int]],
    num_layers: int,
    out: Path,
) -> List[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    import numpy as np

    names = [n for n in entries if runs.get(n)]
    cmap = plt.get_cmap("tab20")
    colour = {n: ("black" if n == "baseline" else cmap(i % 20)) for i, n in enumerate(names)}
    cols = min(num_layers, 3)
    nrows = -(-num_layers // cols)
    written = []

    # 1. held-out phi distribution per layer (seeds pooled), as exceedance P(phi > x)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.8 * nrows), squeeze=False)
    for layer in range(num_layers):
        ax = axes[layer // cols][layer % cols]
        for n in names:
            hists = [r["hist"][layer] for r in runs[n].values() if r.get("hist") and layer in r["hist"]]
            if not hists:
                continue
            edges = np.asarray(next(iter(runs[n].values()))["hist"]["edges"], dtype=float)
            counts = np.sum(np.asarray(hists, dtype=float), axis=0)
            exceed = counts[::-1].cumsum()[::-1][1:] / counts.sum()  # P(phi >= edge_k)
            inh = n != "baseline" and layer in reference_layers[n]
            ax.loglog(
                edges,
                np.where(exceed > 0, exceed, np.nan),
                color=colour[n],
                lw=2.0 if inh else 1.0,
                ls="-" if (inh or n == "baseline") else ":",
                label=n + (" (inhibits)" if inh else ""),
            )
        ax.set_xlim(1e-1, edges[-1] if names else 1e5)
        ax.set_title(f"layer {layer}: held-out P(phi > x)")
        ax.set_xlabel("phi (fresh statistics on the held-out set)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6)
    for k in range(num_layers, nrows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.tight_layout()
    p = out / "phi_distribution.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(p)

    # 2. held-out phi > 5 over training, per layer (mean over seeds at each evaluation)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.8 * nrows), squeeze=False)
    for layer in range(num_layers):
        ax = axes[layer // cols][layer % cols]
        for n in names:
            by_step: Dict[float, List[float]] = {}
            for r in runs[n].values():
                xs, ys = r["series"].get(layer, ([], []))
                for x, y in zip(xs, ys):
                    by_step.setdefault(x, []).append(y)
            if not by_step:
                continue
            steps = sorted(by_step)
            inh = n != "baseline" and layer in reference_layers[n]
            ax.plot(
                steps,
                [sum(by_step[s]) / len(by_step[s]) for s in steps],
                marker="o",
                ms=3,
                color=colour[n],
                lw=2.0 if inh else 1.0,
                ls="-" if (inh or n == "baseline") else ":",
                label=n,
            )
        ax.set_yscale("log")
        ax.set_title(f"layer {layer}: held-out phi > 5 over training")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6)
    for k in range(num_layers, nrows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.tight_layout()
    p = out / "heldout_over_training.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(p)
    return written


def build_report(
    configs: Sequence[str],
    entries: Dict[str, dict],
    seeds: Sequence[int],
    out: Path,
    overrides: Dict[str, object],
    command: str,
    log=print,
) -> dict:
    from neox_l2e.config import load_config
    from neox_l2e.config.loader import resolve_layers

    cfg = load_config(list(configs), {k: v for k, v in overrides.items()})
    L = cfg.model.num_layers
    reference_layers = {n: resolve_layers(e.get("l2e_layers", cfg.l2e.l2e_layers), L) for n, e in entries.items()}
    runs: Dict[str, Dict[int, dict]] = {}
    missing = []
    for n in entries:
        for s in seeds:
            d = out / n / f"seed{s}"
            if (d / "done.json").is_file():
                runs.setdefault(n, {})[s] = read_one(d)
            else:
                missing.append(f"{n}/seed{s}")
    if not runs:
        raise GridError(f"{out}: no finished runs to report on")
    rows = aggregate(runs, entries, L, reference_layers)
    figures = plot_figures(runs, entries, reference_layers, L, out)
    try:
        import torch

        torch_v = torch.__version__
    except ImportError:
        torch_v = "?"
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
        f"python {platform.python_version()}, torch {torch_v}, load average "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg()) if hasattr(os, 'getloadavg') else '?'}"
    )
    head = [
        "# L2E grid report",
        "",
        f"- command: `{command}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- machine: {machine}",
        f"- configs: {', '.join(Path(c).name for c in configs)}; overrides: "
        f"{json.dumps({k: v for k, v in overrides.items() if 'path' not in k and k != 'vocab_file'})}",
        f"- model: {L} layers x {cfg.model.hidden_size}, seq {cfg.model.seq_length}; "
        f"{cfg.training.train_iters} steps of {cfg.training.train_micro_batch_size_per_gpu} x "
        f"{cfg.training.gradient_accumulation_steps} sequences; seeds {', '.join(map(str, seeds))}",
        "- values: mean ± sample standard deviation over seeds; 'vs baseline' and 'overhead' are paired with "
        "the baseline of the same seed; held-out = `ms_heldout/...` at the last evaluation (phi of Eq. 1 on a "
        "fixed held-out set, statistics fresh on it); 'its layers' = the layers the entry inhibits (the "
        "baseline column: the baseline on those same layers)",
        "- downstream eval tasks: not run by this tool (no checkpoints are kept)",
        "",
    ]
    if missing:
        head += [f"- not finished (left out): {', '.join(missing)}", ""]
    lines = head + report_tables(rows, L) + [""] + [f"![{p.stem}]({p.name})" for p in figures]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "report.json").write_text(
        json.dumps(
            {
                "command": command,
                "configs": list(configs),
                "overrides": overrides,
                "seeds": list(seeds),
                "rows": rows,
                "missing": missing,
            },
            indent=2,
            default=str,
        )
    )
    log("\n".join(report_tables(rows, L)[: len(rows) + 2]))
    log(f"wrote {out / 'report.md'}, report.json" + "".join(f", {p.name}" for p in figures))
    return {"rows": rows, "missing": missing, "figures": [str(p) for p in figures]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="key=value config overrides for every run (e.g. train-iters=100)")
    p.add_argument(
        "--config",
        nargs="+",
        default=[str(ROOT / "configs/local/demo.yml")],
        help="yml files of the model and training setup (default: configs/local/demo.yml)",
    )
    p.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (default 1,2,3)")
    p.add_argument(
        "--grid",
        default="full",
        choices=["full", "small"],
        help="full: the paper's 13 entries; small: baseline, l2e-2pct-mid2, memel-2pct-mid2",
    )
    p.add_argument("--only", default=None, help="comma-separated entry names or patterns (e.g. 'baseline,l2e-*-mid2')")
    p.add_argument("--out", default=str(ROOT / "runs/grid"), help="output folder (default runs/grid)")
    p.add_argument("--data-root", default=str(ROOT / "data/shakespeare"), help="where the default corpus is prepared")
    p.add_argument("--no-corpus", action="store_true", help="use the data paths of the configs as they are")
    p.add_argument("--report-only", action="store_true", help="train nothing; report on the finished runs")
    args = p.parse_args(argv)
    from neox_l2e.config import ConfigError, parse_override

    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        p.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    if not seeds:
        p.error("--seeds: give at least one seed")
    command = "python tools/l2e_grid.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    try:
        entries = select_entries(args.grid, args.only)
        overrides = dict(parse_override(o) for o in args.overrides)
        if not args.no_corpus:
            from l2e_sweep import corpus_overrides

            overrides = {**corpus_overrides(args.data_root), **overrides}
        out.mkdir(parents=True, exist_ok=True)
        if not args.report_only:
            run_grid(args.config, entries, seeds, out, overrides)
        build_report(args.config, entries, seeds, out, overrides, command)
    except (ConfigError, GridError, RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished runs are kept; run the same command again to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
