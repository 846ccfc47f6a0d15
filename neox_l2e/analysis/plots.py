"""The figures (matplotlib, Agg backend; files only), after the paper's figures 3-6:

    layerwise_phi.png   mean phi_l* of the sampled neurons per layer (x: relative depth), one line per model,
                        coloured by model size (and the mean phi_-l* dashed)
    ks.png              mean K-S statistic per layer, same colouring
    histograms.png      per model: histogram of log10 phi_l* and log10 phi_-l* of the sampled neurons, and of
                        the K-S statistics
    fkr.png             FKR vs k per layer (one panel per model and tau_k reading)
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Sequence

import numpy as np


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _size_colours(results) -> Dict[str, tuple]:
    sizes = [max(1, r.num_parameters) for r in results]
    lo, hi = math.log10(min(sizes)), math.log10(max(sizes))
    cmap = __import__("matplotlib").colormaps["viridis"]
    return {r.name: cmap(0.1 + 0.8 * ((math.log10(max(1, r.num_parameters)) - lo) / (hi - lo) if hi > lo else 0.5))
            for r in results}


def human_size(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def _depth(r, l):
    return l.layer / max(1, r.num_layers - 1)


def _label(r):
    return f"{r.name} ({human_size(r.num_parameters)})"


def plot_layerwise(results, path) -> Path:
    plt = _plt()
    colours = _size_colours(results)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in sorted(results, key=lambda r: r.num_parameters):
        x = [_depth(r, l) for l in r.layers]
        y = [float(l.phi_lstar[l.sample].mean()) for l in r.layers]
        yn = [float(l.phi_not_lstar[l.sample].mean()) for l in r.layers]
        ax.plot(x, y, "o-", color=colours[r.name], label=_label(r))
        ax.plot(x, yn, "--", color=colours[r.name], alpha=0.6)
    ax.set_xlabel("relative layer depth")
    ax.set_ylabel("mean phi over the neuron's own feature (l*)")
    ax.set_title("Layer-wise mean phi_l* (dashed: phi_-l*)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_ks(results, path) -> Path:
    plt = _plt()
    colours = _size_colours(results)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    any_line = False
    for r in sorted(results, key=lambda r: r.num_parameters):
        pts = [(_depth(r, l), float(np.nanmean(l.ks_stat.numpy()))) for l in r.layers if l.ks_stat is not None]
        if pts:
            any_line = True
            ax.plot(*zip(*pts), "o-", color=colours[r.name], label=_label(r))
    ax.set_xlabel("relative layer depth")
    ax.set_ylabel("mean K-S statistic (own feature vs all)")
    ax.set_title("K-S statistic per layer")
    ax.grid(alpha=0.3)
    if any_line:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "K-S test switched off", ha="center", transform=ax.transAxes)
    return _save(fig, path)


def plot_histograms(results, path) -> Path:
    plt = _plt()
    n = len(results)
    fig, axes = plt.subplots(n, 2, figsize=(9, 2.8 * n), squeeze=False)
    for row, r in enumerate(sorted(results, key=lambda r: r.num_parameters)):
        own = np.concatenate([l.phi_lstar[l.sample].numpy() for l in r.layers])
        other = np.concatenate([l.phi_not_lstar[l.sample].numpy() for l in r.layers])
        bins = np.linspace(min(np.log10(own.clip(1e-6)).min(), np.log10(other.clip(1e-6)).min()),
                           max(np.log10(own.clip(1e-6)).max(), np.log10(other.clip(1e-6)).max()) + 1e-6, 40)
        ax = axes[row, 0]
        ax.hist(np.log10(other.clip(1e-6)), bins=bins, alpha=0.6, label="phi_-l*")
        ax.hist(np.log10(own.clip(1e-6)), bins=bins, alpha=0.6, label="phi_l*")
        ax.set_xlabel("log10 mean phi")
        ax.set_ylabel("neurons")
        ax.set_title(f"{_label(r)}: phi of sampled neurons, all layers", fontsize=9)
        ax.legend(fontsize=8)
        ax = axes[row, 1]
        ks = [l.ks_stat.numpy() for l in r.layers if l.ks_stat is not None]
        if ks:
            ax.hist(np.concatenate(ks), bins=40, range=(0, 1), color="tab:green")
            ax.set_xlabel("K-S statistic")
        else:
            ax.text(0.5, 0.5, "K-S test switched off", ha="center", transform=ax.transAxes)
        ax.set_title(f"{_label(r)}: K-S statistics", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_fkr(results, path, modes: Sequence[str] = ("per-token", "global")) -> Path:
    plt = _plt()
    modes = [m for m in modes if any(m in l.fkr for r in results for l in r.layers)] or ["per-token"]
    rs = sorted(results, key=lambda r: r.num_parameters)
    fig, axes = plt.subplots(len(rs), len(modes), figsize=(5 * len(modes), 3.4 * len(rs)), squeeze=False)
    cmap = __import__("matplotlib").colormaps["plasma"]
    for i, r in enumerate(rs):
        for j, m in enumerate(modes):
            ax = axes[i, j]
            for l in r.layers:
                d = l.fkr.get(m)
                if not d:
                    continue
                ks = sorted(d)
                ax.plot(list(ks), [100 * d[k] for k in ks], "o-", ms=3,
                        color=cmap(0.85 * _depth(r, l)), label=f"layer {l.layer}")
            ax.set_xscale("log")
            ax.set_xlabel("k (% of neurons)" if m == "per-token" else "k (% of neurons x tokens)")
            ax.set_ylabel("FKR (%)")
            ax.set_title(f"{_label(r)}: FKR, {m} tau_k", fontsize=9)
            ax.grid(alpha=0.3)
            if len(r.layers) <= 12:
                ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=110)
    __import__("matplotlib.pyplot").pyplot.close(fig)
    return p


def plot_all(results, out_dir) -> Dict[str, str]:
    out = Path(out_dir)
    return {"layerwise_phi": str(plot_layerwise(results, out / "layerwise_phi.png")),
            "ks": str(plot_ks(results, out / "ks.png")),
            "histograms": str(plot_histograms(results, out / "histograms.png")),
            "fkr": str(plot_fkr(results, out / "fkr.png"))}
