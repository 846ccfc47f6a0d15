"""The figures (matplotlib, Agg backend; files only), after the paper's figures 3-6:

layerwise_phi.png   mean phi_l* of the sampled neurons per layer (x: relative depth), one line per run in its
                    own colour (legend: name and size), the mean phi_-l* dashed; layers L2E inhibited in the
                    run drawn as large hollow squares
ks.png              mean K-S statistic per layer, same colours and marks
histograms.png      per model: histogram of log10 phi_l* and log10 phi_-l* of the sampled neurons, and of
                    the K-S statistics
fkr.png             FKR vs k per layer (one panel per model and tau_k reading, shared y-axis), with the
                    FKR of random kills (chance) dashed
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Sequence

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def run_colours(names: Sequence[str]) -> Dict[str, tuple]:
    """One distinct colour per run, in the given order (tab10, then tab20 beyond 10 runs)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {n: cmap(i % cmap.N) for i, n in enumerate(names)}


def human_size(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def _depth(r, l):
    return l.layer / max(1, r.num_layers - 1)


def _label(r):
    lab = f"{r.name} ({human_size(r.num_parameters)})"
    inh = getattr(r, "inhibited_layers", None)
    return lab + (f", L2E on layers {','.join(map(str, inh))}" if inh else "")


def _mark_inhibited(ax, r, points, colour) -> bool:
    """Large hollow squares on the points (depth, value) of the layers L2E inhibited in run r."""
    inh = set(getattr(r, "inhibited_layers", None) or [])
    pts = [(x, y) for (x, y), l in zip(points, r.layers) if l.layer in inh]
    if pts:
        ax.plot(*zip(*pts), "s", ms=12, mfc="none", mec=colour, mew=1.6, zorder=3)
    return bool(pts)


def _inhibited_legend(ax, any_marked: bool) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if any_marked:
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], ls="none", marker="s", ms=10, mfc="none", mec="0.3", mew=1.6))
        labels.append("layer inhibited by L2E")
    ax.legend(handles, labels, fontsize=8)


def plot_layerwise(results, path) -> Path:
    return _save(layerwise_figure(results), path)


def layerwise_figure(results):
    plt = _plt()
    colours = run_colours([r.name for r in results])
    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    marked = False
    for r in results:
        x = [_depth(r, l) for l in r.layers]
        y = [float(l.phi_lstar[l.sample].mean()) for l in r.layers]
        yn = [float(l.phi_not_lstar[l.sample].mean()) for l in r.layers]
        ax.plot(x, y, "o-", color=colours[r.name], label=_label(r))
        ax.plot(x, yn, "--", color=colours[r.name], alpha=0.6)
        marked |= _mark_inhibited(ax, r, list(zip(x, y)), colours[r.name])
    ax.set_xlabel("relative layer depth")
    ax.set_ylabel("mean phi over the neuron's own feature (l*)")
    ax.set_title("Layer-wise mean phi_l* (dashed: phi_-l*)")
    ax.grid(alpha=0.3)
    _inhibited_legend(ax, marked)
    return fig


def plot_ks(results, path) -> Path:
    plt = _plt()
    colours = run_colours([r.name for r in results])
    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    any_line = marked = False
    for r in results:
        pts = [(_depth(r, l), float(np.nanmean(l.ks_stat.numpy()))) for l in r.layers if l.ks_stat is not None]
        if pts:
            any_line = True
            ax.plot(*zip(*pts), "o-", color=colours[r.name], label=_label(r))
            marked |= _mark_inhibited(ax, r, pts, colours[r.name])
    ax.set_xlabel("relative layer depth")
    ax.set_ylabel("mean K-S statistic (own feature vs all)")
    ax.set_title("K-S statistic per layer")
    ax.grid(alpha=0.3)
    if any_line:
        _inhibited_legend(ax, marked)
    else:
        ax.text(0.5, 0.5, "K-S test switched off", ha="center", transform=ax.transAxes)
    return _save(fig, path)


def plot_histograms(results, path) -> Path:
    plt = _plt()
    n = len(results)
    fig, axes = plt.subplots(n, 2, figsize=(9, 2.8 * n), squeeze=False)
    for row, r in enumerate(results):
        own = np.concatenate([l.phi_lstar[l.sample].numpy() for l in r.layers])
        other = np.concatenate([l.phi_not_lstar[l.sample].numpy() for l in r.layers])
        bins = np.linspace(
            min(np.log10(own.clip(1e-6)).min(), np.log10(other.clip(1e-6)).min()),
            max(np.log10(own.clip(1e-6)).max(), np.log10(other.clip(1e-6)).max()) + 1e-6,
            40,
        )
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
    rs = list(results)
    fig, axes = plt.subplots(len(rs), len(modes), figsize=(5 * len(modes), 3.4 * len(rs)), squeeze=False, sharey=True)
    cmap = __import__("matplotlib").colormaps["plasma"]
    for i, r in enumerate(rs):
        chance = [r.chance_fkr(l) for l in r.layers] if hasattr(r, "chance_fkr") else []
        for j, m in enumerate(modes):
            ax = axes[i, j]
            for l in r.layers:
                d = l.fkr.get(m)
                if not d:
                    continue
                ks = sorted(d)
                inh = l.layer in set(getattr(r, "inhibited_layers", None) or [])
                ax.plot(
                    list(ks),
                    [100 * d[k] for k in ks],
                    "s-" if inh else "o-",
                    ms=4 if inh else 3,
                    color=cmap(0.85 * _depth(r, l)),
                    label=f"layer {l.layer}" + (" (L2E)" if inh else ""),
                )
            if chance:
                ax.axhline(
                    100 * float(np.mean(chance)),
                    color="0.35",
                    ls="--",
                    lw=1.2,
                    label=f"chance ({100 * float(np.mean(chance)):.0f}%: random kills)",
                )
            ax.set_xscale("log")
            ks_all = sorted({k for l in r.layers for k in l.fkr.get(m, {})})
            if ks_all:
                ax.set_xticks(ks_all)
                ax.set_xticklabels([f"{k:g}" for k in ks_all])
                ax.minorticks_off()
            ax.set_xlabel("k (% of neurons)" if m == "per-token" else "k (% of neurons x tokens)")
            ax.set_ylabel("FKR (%)")
            ax.set_ylim(0, 100)
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
    return {
        "layerwise_phi": str(plot_layerwise(results, out / "layerwise_phi.png")),
        "ks": str(plot_ks(results, out / "ks.png")),
        "histograms": str(plot_histograms(results, out / "histograms.png")),
        "fkr": str(plot_fkr(results, out / "fkr.png")),
    }
