"""Writing scan results: JSON summary, per-neuron CSV, FKR table."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import List, Sequence

from .scan import ScanResult


def _clean(x):
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_json(obj, path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(_clean(obj), indent=2) + "\n")
    return p


def write_scan_report(results: Sequence[ScanResult], out_dir, extra: dict = None) -> dict:
    """report.json (per model and layer), neurons.csv (one row per model, layer, neuron), layers.csv."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": str(write_json({"models": [r.summary() for r in results], **(extra or {})}, out / "report.json"))}
    with open(out / "layers.csv", "w", newline="") as f:
        w = csv.writer(f)
        head = [
            "model",
            "num_parameters",
            "layer",
            "relative_depth",
            "num_neurons",
            "mean_phi_lstar_sample",
            "mean_phi_not_lstar_sample",
            "mean_ks_stat_sample",
        ]
        fkr_cols = sorted({(m, k) for r in results for l in r.layers for m, d in l.fkr.items() for k in d})
        w.writerow(head + [f"fkr_{m}_{k:g}" for m, k in fkr_cols])
        for r in results:
            for l in r.layers:
                s = l.summary(r.label_names)
                w.writerow(
                    [
                        r.name,
                        r.num_parameters,
                        l.layer,
                        _depth(l.layer, r.num_layers),
                        l.num_neurons,
                        s["mean_phi_lstar_sample"],
                        s["mean_phi_not_lstar_sample"],
                        s.get("mean_ks_stat_sample", ""),
                    ]
                    + [l.fkr.get(m, {}).get(k, "") for m, k in fkr_cols]
                )
    files["layers_csv"] = str(out / "layers.csv")
    with open(out / "neurons.csv", "w", newline="") as f:
        w = csv.writer(f)
        labels = results[0].label_names if results else []
        w.writerow(
            ["model", "layer", "neuron", "l_star", "phi_lstar", "phi_not_lstar", "in_sample", "ks_stat", "ks_pvalue"]
            + [f"phi_{n}" for n in labels]
        )
        for r in results:
            for l in r.layers:
                ks = (
                    {int(j): (float(l.ks_stat[m]), float(l.ks_pvalue[m])) for m, j in enumerate(l.sample)}
                    if l.ks_stat is not None
                    else {}
                )
                insample = set(int(j) for j in l.sample)
                pl, pn, ls, table = (
                    l.phi_lstar.tolist(),
                    l.phi_not_lstar.tolist(),
                    l.l_star.tolist(),
                    l.phi_l.t().tolist(),
                )
                for j in range(l.num_neurons):
                    k = ks.get(j, ("", ""))
                    w.writerow(
                        [
                            r.name,
                            l.layer,
                            j,
                            r.label_names[ls[j]],
                            f"{pl[j]:.6g}",
                            f"{pn[j]:.6g}",
                            int(j in insample),
                            k[0] if k[0] == "" else f"{k[0]:.6g}",
                            k[1] if k[1] == "" else f"{k[1]:.6g}",
                        ]
                        + [f"{v:.6g}" for v in table[j]]
                    )
    files["neurons_csv"] = str(out / "neurons.csv")
    return files


def _depth(layer: int, num_layers: int) -> float:
    return layer / max(1, num_layers - 1)


def fkr_table(results: Sequence[ScanResult], mode: str) -> List[str]:
    """Markdown lines: one row per (model, layer), one column per k (percent)."""
    ks = sorted({k for r in results for l in r.layers for k in l.fkr.get(mode, {})})
    lines = [
        f"FKR ({mode} tau_k), percent of kills that hit a token outside the neuron's l*",
        "",
        "| model | layer | " + " | ".join(f"k={k:g}%" for k in ks) + " |",
        "|---|---|" + "---|" * len(ks),
    ]
    for r in results:
        for l in r.layers:
            vals = [l.fkr.get(mode, {}).get(k) for k in ks]
            lines.append(
                f"| {r.name} | {l.layer} | "
                + " | ".join("-" if v is None or v != v else f"{100 * v:.1f}" for v in vals)
                + " |"
            )
    return lines
