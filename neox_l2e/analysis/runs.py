"""Reading training runs (metrics.jsonl) and comparing them side by side (baseline vs L2E).

metrics.jsonl: one JSON object per logged step. Read defensively, any of:
    step:        "step" or "iteration"
    train loss:  "loss" or "lm_loss" (records with "kind" absent or "train"), or "train/loss"
    lr:          "lr" or "train/lr"
    valid loss:  "valid/loss" or "valid/lm_loss", or "loss"/"lm_loss" in a record with "kind": "valid"
    L2E:         "l2e_train/layer{i}/{metric}" (frac_selected, frac_phi_gt_5, tau, loss_ms, ...: against the
                 inhibitor's running statistics), or "l2e/layer{i}/{metric}" (runs logged before the rename)
    held-out:    "ms_heldout/layer{i}/{metric}" in "valid" records (neox_l2e.l2e.heldout: fresh statistics on a
                 fixed token set), read into Run.heldout and as L2E metric "heldout/{metric}"; the phi
                 histograms in "ms_heldout_hist" records; the inhibited layers in the "run" record ("l2e_layers").
                 ``l2e_metric_key`` is the one place that maps names.
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
    l2e: Dict[str, Dict[int, Series]] = field(default_factory=dict)  # metric -> layer -> series
    heldout: Dict[str, Dict[int, Series]] = field(default_factory=dict)  # ms_heldout metric -> layer -> series
    heldout_hist: Optional[dict] = None  # last {"iteration", "edges", layer: counts}
    inhibited_layers: List[int] = field(default_factory=list)
    evals: List[dict] = field(default_factory=list)  # tools/evaluate.py run records
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
            if kind == "run":
                run.inhibited_layers = [int(i) for i in rec.get("l2e_layers") or []]
                continue
            if kind == "ms_heldout_hist":
                run.heldout_hist = {
                    "iteration": step,
                    "edges": rec.get("edges"),
                    **{int(k[5:]): v for k, v in rec.items() if k.startswith("layer")},
                }
                continue
            if kind == "valid":
                _add(run.valid_loss, step, rec.get("loss", rec.get("lm_loss", rec.get("valid/loss"))))
                for k, v in rec.items():
                    lm = l2e_metric_key(str(k))
                    if lm and lm[1].startswith("heldout/"):
                        layer, metric = lm
                        _add(run.heldout.setdefault(metric[len("heldout/") :], {}).setdefault(layer, ([], [])), step, v)
                        _add(run.l2e.setdefault(metric, {}).setdefault(layer, ([], [])), step, v)
                continue
            if kind not in (None, "train"):
                continue
            _add(
                run.train_loss,
                step,
                rec.get("loss", rec.get("lm_loss", rec.get("train/loss", rec.get("train/lm_loss")))),
            )
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
        raise AnalysisError(f'{p}: expected tools/evaluate.py output ({{"runs": [...]}})')
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
    raise AnalysisError(
        f"{source}: results for models {', '.join(models)}, none named {run_name!r}; name the run "
        f"after its model (MODEL=PATH) or --eval MODEL=FILE with that model's name"
    )


# chance accuracy of tasks whose every question has the same number of choices (older evaluate.py files,
# which do not record it)
KNOWN_CHANCE = {"mmlu": 0.25, "sciq": 0.25, "piqa": 0.5}


def eval_entries(
    run: Run, metric_order=("acc_norm", "acc")
) -> Dict[str, Tuple[float, Optional[float], Optional[float]]]:
    """{"task metric (n-shot)": (score, stderr or None, chance accuracy or None)} using the first metric present
    per task (acc_norm before acc)."""
    out = {}
    for r in run.evals:
        chance = r.get("chance") or {}
        for task, vals in r["results"].items():
            for m in metric_order:
                if m in vals:
                    se = vals.get(f"{m}_stderr")
                    se = se if isinstance(se, (int, float)) and math.isfinite(se) else None
                    c = chance.get(task, KNOWN_CHANCE.get(task))
                    out[f"{task} {m} ({r.get('num_fewshot', 0)}-shot)"] = (vals[m], se, c)
                    break
    return out


def eval_scores(run: Run, metric_order=("acc_norm", "acc")) -> Dict[str, float]:
    """{"task metric (n-shot)": score} using the first metric present per task (acc_norm before acc)."""
    return {k: v[0] for k, v in eval_entries(run, metric_order).items()}


def fmt(v: Optional[float], digits: int = 4) -> str:
    """A table cell: fixed decimals, but 3 significant digits for small magnitudes (1.23e-05, not 0.0000)."""
    if v is None or v != v:
        return "-"
    if v != 0 and abs(v) < 10 ** -(digits - 2):
        return f"{v:.3g}" if abs(v) >= 1e-4 else f"{v:.2e}"
    return f"{v:.{digits}f}"


def layer_tail(run: Run, metric: str, frac: float = 0.1) -> Dict[int, float]:
    """{layer: mean of the metric over its last ``frac`` of logged steps}."""
    out = {}
    for layer, series in sorted(run.l2e.get(metric, {}).items()):
        v = tail_mean(series, frac)
        if v is not None:
            out[layer] = v
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
    head = (
        ["run", "steps", "train loss (last 10%)", "valid loss (last)", "valid loss (min)"]
        + [f"{m} (mean of layers, last 10%)" for m in l2e_metrics]
        + tasks
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        entries = eval_entries(r)
        cells = [
            r.name,
            str(int(max(r.train_loss[0] or r.valid_loss[0] or [0]))),
            fmt(tail_mean(r.train_loss)),
            fmt(r.valid_loss[1][-1] if r.valid_loss[1] else None),
            fmt(min(r.valid_loss[1]) if r.valid_loss[1] else None),
        ]
        cells += [fmt(tail_mean(layer_mean(r, m))) for m in l2e_metrics]
        for t in tasks:
            v, se, _ = entries.get(t, (None, None, None))
            cells.append(fmt(v) + (f" ± {fmt(se)}" if v is not None and se is not None else ""))
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
    return [
        (pre[min(len(ys), i + h + 1)] - pre[max(0, i - h)]) / (min(len(ys), i + h + 1) - max(0, i - h))
        for i in range(len(ys))
    ]


def plot_runs(runs: Sequence[Run], path, l2e_metrics=("frac_selected", "frac_phi_gt_5")) -> Path:
    """``runs_figure`` written to ``path`` (PNG)."""
    import matplotlib.pyplot as plt

    fig = runs_figure(runs, l2e_metrics)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


def runs_figure(runs: Sequence[Run], l2e_metrics=("frac_selected", "frac_phi_gt_5")):
    """Four panels, each telling the runs apart: LM loss; the L2E metrics (mean over layers) over steps and per
    layer at the end of the run (log scale: the fractions are small); eval scores with lm-eval's stderr as
    error bars and the chance accuracy."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from .plots import run_colours

    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    colours = run_colours([r.name for r in runs])
    ax = axes[0, 0]
    for r in runs:
        c = colours[r.name]
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
    styles = ["-", ":", "--", "-."]
    ax = axes[0, 1]
    drew = False
    for r in runs:
        for j, m in enumerate(l2e_metrics):
            xs, ys = layer_mean(r, m)
            pos = [(x, y) for x, y in zip(xs, ys) if y > 0]
            if pos:
                drew = True
                ax.plot(*zip(*pos), styles[j % len(styles)], color=colours[r.name], label=f"{r.name}: {m}")
    ax.set_xlabel("step")
    ax.set_title("L2E metrics, mean over the layers that log them")
    _log_or_note(ax, drew, "no L2E metrics logged")
    ax = axes[1, 0]
    drew = False
    for r in runs:
        for j, m in enumerate(l2e_metrics):
            pts = [(layer, v) for layer, v in layer_tail(r, m).items() if v > 0]
            if pts:
                drew = True
                ax.plot(*zip(*pts), styles[j % len(styles)], marker="o", color=colours[r.name], label=f"{r.name}: {m}")
    ax.set_xlabel("layer")
    ax.set_title("L2E metrics per layer (mean of the last 10% of steps)")
    _log_or_note(ax, drew, "no per-layer L2E metrics logged")
    if drew:
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax = axes[1, 1]
    entries = {r.name: eval_entries(r) for r in runs}
    tasks = sorted({k for e in entries.values() for k in e})
    if tasks:
        width = 0.8 / len(runs)
        for i, r in enumerate(runs):
            e = entries[r.name]
            xs = [t + i * width for t in range(len(tasks)) if tasks[t] in e]
            vals = [e[tasks[t]] for t in range(len(tasks)) if tasks[t] in e]
            if xs:
                ax.bar(
                    xs,
                    [v[0] for v in vals],
                    width,
                    color=colours[r.name],
                    label=r.name,
                    yerr=[v[1] or 0.0 for v in vals],
                    capsize=3,
                    error_kw={"elinewidth": 1},
                )
        labelled = False
        for t, task in enumerate(tasks):
            chance = next((e[task][2] for e in entries.values() if task in e and e[task][2] is not None), None)
            if chance is not None:
                ax.hlines(
                    chance,
                    t - width / 2 - 0.05,
                    t + 0.8 - width / 2 + 0.05,
                    colors="0.2",
                    linestyles="--",
                    lw=1.2,
                    label=None if labelled else "chance",
                )
                labelled = True
        ax.set_xticks([t + 0.4 - width / 2 for t in range(len(tasks))])
        ax.set_xticklabels(tasks, rotation=20, ha="right", fontsize=7)
        ax.set_ylabel("score (error bars: lm-eval's stderr)")
        top = max(v[0] + (v[1] or 0.0) for e in entries.values() for v in e.values())
        ax.set_ylim(0, max(top, 0.01) * 1.3)  # room for the legend above the bars
        ax.legend(fontsize=8, loc="upper center", ncol=min(len(runs) + 1, 4))
    else:
        ax.text(0.5, 0.5, "no eval results (tools/evaluate.py --out RUN/eval)", ha="center", transform=ax.transAxes)
    ax.set_title("Evaluation")
    fig.tight_layout()
    return fig


def _log_or_note(ax, drew: bool, note: str) -> None:
    ax.grid(alpha=0.3, which="both")
    if drew:
        ax.set_yscale("log")
        ax.set_ylabel("fraction (log scale)")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, note, ha="center", transform=ax.transAxes)
