"""Reading training runs (metrics.jsonl) and comparing them side by side (baseline vs L2E).

metrics.jsonl: one JSON object per logged step. Read defensively, any of:
    step:        "step" or "iteration"
    train loss:  "loss" or "lm_loss" (records with "kind" absent or "train"), or "train/loss"
    lr:          "lr" or "train/lr"
    valid loss:  "valid/loss" or "valid/lm_loss", or "loss"/"lm_loss" in a record with "kind": "valid"
    L2E:         "l2e/layer{i}/{metric}" or "l2e_train/layer{i}/{metric}" (frac_selected, frac_phi_gt_5, tau,
                 loss_ms, ...), and held-out measurements "ms_heldout/layer{i}/{metric}" (read as metric
                 "heldout/{metric}"); ``l2e_metric_key`` is the one place that maps names
Lines that are not JSON objects are skipped (a run may be writing its last line while we read).
Eval scores: tools/evaluate.py JSON files (``{"runs": [...]}``, one record per model and shot count, each naming
its ``model``) found in the run folder (eval*.json, eval/*.json) or given explicitly; ``select_evals`` keeps the
records of the run's own model.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .common import AnalysisError

L2E_KEY = re.compile(r"^(l2e|l2e_train|ms_heldout)/layer(\d+)/(.+)$")
Series = Tuple[List[float], List[float]]


@dataclass
class Run:
    name: str
    path: str
    train_loss: Series = field(default_factory=lambda: ([], []))
    lr: Series = field(default_factory=lambda: ([], []))
    valid_loss: Series = field(default_factory=lambda: ([], []))
    l2e: Dict[str, Dict[int, Series]] = field(default_factory=dict)     # metric -> layer -> series
    evals: List[dict] = field(default_factory=list)                      # tools/evaluate.py run records
    skipped_lines: int = 0


def _num(v) -> Optional[float]:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _add(series: Series, step, value) -> None:
    v = _num(value)
    if v is not None and step is not None:
        series[0].append(float(step))
        series[1].append(v)


def l2e_metric_key(key: str) -> Optional[Tuple[int, str]]:
    """(layer, metric) for a per-layer L2E key of metrics.jsonl, None for other keys. The running-statistics
    metrics ("l2e/layer3/frac_selected", or "l2e_train/layer3/frac_selected") are read as "frac_selected"; the
    held-out measurements ("ms_heldout/layer3/frac_phi_gt_5") as "heldout/frac_phi_gt_5"."""
    m = L2E_KEY.match(key)
    if not m:
        return None
    prefix, layer, metric = m.group(1), int(m.group(2)), m.group(3)
    return layer, (f"heldout/{metric}" if prefix == "ms_heldout" else metric)


def find_metrics(path) -> Path:
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise AnalysisError(f"{p}: run not found")
    if (p / "metrics.jsonl").is_file():
        return p / "metrics.jsonl"
    found = sorted(p.rglob("metrics.jsonl"))
    if not found:
        raise AnalysisError(f"{p}: no metrics.jsonl in this run folder")
    return found[0]


def read_run(path, name: Optional[str] = None) -> Run:
    mfile = find_metrics(path)
    run_dir = mfile.parent
    run = Run(name=name or (Path(path).name if Path(path).is_dir() else run_dir.name), path=str(path))
    with open(mfile, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                run.skipped_lines += 1
                continue
            if not isinstance(rec, dict):
                run.skipped_lines += 1
                continue
            step = _num(rec.get("step", rec.get("iteration")))
            kind = rec.get("kind")
            if kind == "valid":
                _add(run.valid_loss, step, rec.get("loss", rec.get("lm_loss", rec.get("valid/loss"))))
                continue
            if kind not in (None, "train"):
                continue
            _add(run.train_loss, step, rec.get("loss", rec.get("lm_loss", rec.get("train/loss", rec.get("train/lm_loss")))))
            _add(run.lr, step, rec.get("lr", rec.get("train/lr")))
            _add(run.valid_loss, step, rec.get("valid/loss", rec.get("valid/lm_loss")))
            for k, v in rec.items():
                lm = l2e_metric_key(str(k))
                if lm:
                    _add(run.l2e.setdefault(lm[1], {}).setdefault(lm[0], ([], [])), step, v)
    if not run.train_loss[0] and not run.valid_loss[0]:
        raise AnalysisError(f"{mfile}: no loss records (expected 'loss' or 'lm_loss' with 'step' or 'iteration')")
    for cand in sorted(run_dir.glob("eval*.json")) + sorted((run_dir / "eval").glob("*.json")):
        run.evals += select_evals(read_eval_file(cand), run.name, cand)
    return run


def read_eval_file(path) -> List[dict]:
    p = Path(path)
    try:
        obj = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AnalysisError(f"{p}: not an evaluation JSON ({e})") from None
    runs = obj.get("runs") if isinstance(obj, dict) else None
    if not isinstance(runs, list):
        raise AnalysisError(f"{p}: expected tools/evaluate.py output ({{\"runs\": [...]}})")
    return [r for r in runs if isinstance(r, dict) and isinstance(r.get("results"), dict)]


def select_evals(records: Sequence[dict], run_name: str, source) -> List[dict]:
    """The records of ``run_name``'s model in one evaluation file: those whose ``model`` is the run's name; all of
    them when the file holds one model only (whatever it is called). A file with several models, none of them
    named like the run, is an error (taking any of them would give the run another model's scores)."""
    models = sorted({str(r.get("model", "?")) for r in records})
    own = [r for r in records if str(r.get("model", "?")) == run_name]
    if own:
        return own
    if len(models) <= 1:
        return list(records)
    raise AnalysisError(f"{source}: results for models {', '.join(models)}, none named {run_name!r}; name the run "
                        f"after its model (MODEL=PATH) or --eval MODEL=FILE with that model's name")


def eval_scores(run: Run, metric_order=("acc_norm", "acc")) -> Dict[str, float]:
    """{"task (n-shot)": score} using the first metric present per task (acc_norm before acc)."""
    out = {}
    for r in run.evals:
        for task, vals in r["results"].items():
            for m in metric_order:
                if m in vals:
                    out[f"{task} {m} ({r.get('num_fewshot', 0)}-shot)"] = vals[m]
                    break
    return out


def tail_mean(series: Series, frac: float = 0.1) -> Optional[float]:
    ys = series[1]
    if not ys:
        return None
    n = max(1, int(len(ys) * frac))
    return sum(ys[-n:]) / n


def layer_mean(run: Run, metric: str) -> Series:
    """The metric averaged over layers at each step where any layer logged it."""
    by_step: Dict[float, List[float]] = {}
    for xs, ys in run.l2e.get(metric, {}).values():
        for x, y in zip(xs, ys):
            by_step.setdefault(x, []).append(y)
    steps = sorted(by_step)
    return steps, [sum(by_step[s]) / len(by_step[s]) for s in steps]


def summary_table(runs: Sequence[Run], l2e_metrics=("frac_selected", "frac_phi_gt_5")) -> List[str]:
    tasks = sorted({k for r in runs for k in eval_scores(r)})
    head = ["run", "steps", "train loss (last 10%)", "valid loss (last)", "valid loss (min)"] + \
           [f"{m} (mean of layers, last 10%)" for m in l2e_metrics] + tasks
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def f(v, d=4):
        return "-" if v is None else f"{v:.{d}f}"
    for r in runs:
        scores = eval_scores(r)
        cells = [r.name, str(int(max(r.train_loss[0] or r.valid_loss[0] or [0]))), f(tail_mean(r.train_loss)),
                 f(r.valid_loss[1][-1] if r.valid_loss[1] else None), f(min(r.valid_loss[1]) if r.valid_loss[1] else None)]
        cells += [f(tail_mean(layer_mean(r, m))) for m in l2e_metrics]
        cells += [f(scores.get(t)) for t in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _smooth(ys: List[float], window: int) -> List[float]:
    """Centred moving average (no lag, unlike an EMA; shorter windows at the ends)."""
    if window <= 1:
        return list(ys)
    h = window // 2
    pre = [0.0]
    for y in ys:
        pre.append(pre[-1] + y)
    return [(pre[min(len(ys), i + h + 1)] - pre[max(0, i - h)]) / (min(len(ys), i + h + 1) - max(0, i - h))
            for i in range(len(ys))]


def plot_runs(runs: Sequence[Run], path, l2e_metrics=("frac_selected", "frac_phi_gt_5")) -> Path:
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ax = axes[0, 0]
    for i, r in enumerate(runs):
        c = colours[i % len(colours)]
        xs, ys = r.train_loss
        if xs:
            ax.plot(xs, ys, color=c, alpha=0.25, lw=0.8)
            ax.plot(xs, _smooth(ys, max(1, len(ys) // 40)), color=c, label=f"{r.name} train")
        vx, vy = r.valid_loss
        if vx:
            ax.plot(vx, vy, "o--", color=c, ms=4, label=f"{r.name} valid")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("LM loss (train: moving average over the faint raw curve)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    for i, r in enumerate(runs):
        xs, ys = r.lr
        if xs:
            ax.plot(xs, ys, color=colours[i % len(colours)], label=r.name)
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_title("Learning rate")
    ax.grid(alpha=0.3)
    if any(r.lr[0] for r in runs):
        ax.legend(fontsize=8)
    ax = axes[1, 0]
    styles = ["-", ":", "--", "-."]
    drew = False
    for i, r in enumerate(runs):
        for j, m in enumerate(l2e_metrics):
            xs, ys = layer_mean(r, m)
            if xs:
                drew = True
                ax.plot(xs, ys, styles[j % len(styles)], color=colours[i % len(colours)], label=f"{r.name}: {m}")
    ax.set_xlabel("step")
    ax.set_title("L2E metrics (mean over inhibited layers)")
    ax.grid(alpha=0.3)
    if drew:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no L2E metrics logged", ha="center", transform=ax.transAxes)
    ax = axes[1, 1]
    tasks = sorted({k for r in runs for k in eval_scores(r)})
    if tasks:
        width = 0.8 / len(runs)
        for i, r in enumerate(runs):
            s = eval_scores(r)
            ax.bar([t + i * width for t in range(len(tasks))], [s.get(t, 0.0) for t in tasks], width,
                   color=colours[i % len(colours)], label=r.name)
        ax.set_xticks([t + 0.4 - width / 2 for t in range(len(tasks))])
        ax.set_xticklabels(tasks, rotation=20, ha="right", fontsize=7)
        ax.set_ylabel("score")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no eval results (tools/evaluate.py --out RUN/eval)", ha="center", transform=ax.transAxes)
    ax.set_title("Evaluation")
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p
