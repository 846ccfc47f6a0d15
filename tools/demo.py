#!/usr/bin/env python
"""`make demo`: prepare the default corpus, train a small Pythia-style model with L2E, summarise.

    python tools/demo.py                 # fresh run into runs/demo (the prepared data is reused)
    python tools/demo.py --resume        # continue runs/demo from its latest checkpoint
    python tools/demo.py train-iters=100 # any config key can be overridden

Writes runs/demo/: metrics.jsonl, tensorboard/, checkpoints/ (DeepSpeed checkpoint), loss.png,
summary.json; prints a short summary (first/last training loss, validation loss, tokens/s, time) and the
monosemanticity of every layer side by side, inhibited and not: ms_heldout (phi of Eq. 1 on the fixed held-out
set with statistics fresh on it: the effect) next to l2e_train (phi against the inhibitor's running statistics,
which L2E shrinks: not a measure of the effect by itself).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train the demo model (see docs/training.md).")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.add_argument(
        "--config",
        nargs="+",
        metavar="YML",
        default=[str(ROOT / "configs/local/demo.yml"), str(ROOT / "configs/l2e/l2e-2pct-mid2.yml")],
        help="yml files merged in order, as train.py does (default: configs/local/demo.yml "
        "configs/l2e/l2e-2pct-mid2.yml, the demo model with L2E mid2 at p = 2%%)",
    )
    p.add_argument(
        "--out",
        default=str(ROOT / "runs/demo"),
        help="run folder: checkpoints/, metrics.jsonl, tensorboard/, loss.png, summary.json (default: runs/demo)",
    )
    p.add_argument(
        "--data-root",
        default=str(ROOT / "data/shakespeare"),
        help="where the default corpus is prepared once (default: data/shakespeare)",
    )
    p.add_argument("--resume", action="store_true", help="continue from runs/demo's latest checkpoint")
    args = p.parse_intermixed_args(argv)
    # `--config a.yml key=value`: the nargs="+" option also takes the overrides that follow it
    args.overrides = [c for c in args.config if "=" in c] + args.overrides
    args.config = [c for c in args.config if "=" not in c] or p.get_default("config")
    return args


def read_metrics(path: Path) -> list:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot(records: list, out: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train = [
        (r["iteration"], r["lm_loss"])
        for r in records
        if r["kind"] == "train" and "lm_loss" in r and r["lm_loss"] is not None and math.isfinite(r["lm_loss"])
    ]
    valid = [(r["iteration"], r["lm_loss"]) for r in records if r["kind"] == "valid"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train (log-interval mean)")
    if valid:
        ax.plot(*zip(*valid), "o-", label="valid")
    ax.set_xlabel("step")
    ax.set_ylabel("LM loss (nats/token)")
    ax.set_title("neox-l2e demo")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return True


def monosemanticity_table(heldout: dict, running: dict, inhibited, levels) -> list:
    """Every layer side by side: ms_heldout (fixed held-out set, fresh statistics: the effect) and, for the
    inhibited layers, l2e_train (against the running statistics, last log window) and the variance ratio."""
    layers = sorted(set(heldout) | set(running))
    if not layers:
        return []
    lv = [f"{v:g}" for v in levels[:3]]

    def f(v, fmt=".2e"):
        return "-" if v is None else format(v, fmt)

    head = (
        ["layer"]
        + [f"held-out phi>{x}" for x in lv]
        + ["max-phi med", "kurtosis med", "var held-out/running"]
        + [f"train-stat phi>{lv[0]}" if lv else "train-stat"]
    )
    rows = [head]
    for i in layers:
        h, r = heldout.get(i, {}), running.get(i, {})
        rows.append(
            [f"{i}{' *' if i in inhibited else ''}"]
            + [f(h.get(f"frac_phi_gt_{x}")) for x in lv]
            + [
                f(h.get("max_phi_median"), ".4g"),
                f(h.get("kurtosis_median"), ".4g"),
                f(h.get("var_ratio_median"), ".3g"),
                f(r.get(f"frac_phi_gt_{lv[0]}") if lv else None),
            ]
        )
    widths = [max(len(row[c]) for row in rows) for c in range(len(head))]
    out = [
        "monosemanticity per layer (* inhibited), last evaluation",
        "  held-out   = ms_heldout/...: phi on the fixed held-out set, statistics fresh on it (compare with these)",
        "  train-stat = l2e_train/...: phi against the inhibitor's running statistics (L2E lowers it by shrinking",
        "               the layer below its own history; not a measure of the effect)",
    ]
    out += ["  " + "  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    from neox_l2e.config import ConfigError, load_config, parse_override
    from neox_l2e.training import CheckpointError, TrainingError

    errors = [ConfigError, CheckpointError, TrainingError]
    try:
        from neox_l2e.data import DataError

        errors.append(DataError)
    except ImportError:
        pass
    out = Path(args.out)
    t0 = time.time()
    try:
        from neox_l2e.data import prepare_default_corpus

        corpus = prepare_default_corpus(root=args.data_root)
        print(
            f"corpus: train {corpus['train_prefix']} | valid {corpus['valid_prefix']} | "
            f"tokenizer {corpus['tokenizer']} ({time.time() - t0:.1f} s)"
        )
        tok = str(corpus["tokenizer"])
        overrides = {
            "train_data_paths": [str(corpus["train_prefix"])],
            "valid_data_paths": [str(corpus["valid_prefix"])],
            "vocab_file": tok,
            "tokenizer_type": "HFTokenizer" if tok.endswith(".json") else "SPMTokenizer",
            "save": str(out / "checkpoints"),
            "log_dir": str(out),
        }
        if args.resume:
            overrides["load"] = str(out / "checkpoints")
        overrides.update(dict(parse_override(o) for o in args.overrides))
        cfg = load_config(args.config, overrides)
        if not args.resume and out.exists():
            for name in ("checkpoints", "metrics.jsonl", "tensorboard", "loss.png", "summary.json"):
                p = out / name
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
        from neox_l2e.training.loop import train

        result = train(cfg)
    except tuple(errors) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    elapsed = time.time() - t0

    records = read_metrics(out / "metrics.jsonl")
    plotted = plot(records, out / "loss.png")
    losses = [l for _, l in result.train_losses if math.isfinite(l)]
    summary = {
        "steps": result.iteration,
        "start_step": result.start_iteration,
        "first_train_loss": losses[0] if losses else None,
        "last_train_loss": losses[-1] if losses else None,
        "last10_train_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
        "valid_loss": result.valid_losses[-1][1] if result.valid_losses else None,
        "tokens_per_s": result.tokens_per_s,
        "time_s": elapsed,
        "train_time_s": result.elapsed_s,
        "parameters": result.num_parameters,
        "skipped_steps": result.skipped_steps,
        "checkpoint": str(out / "checkpoints"),
        "l2e_train": {str(k): v for k, v in result.l2e_metrics.items()},
        "ms_heldout": {str(k): v for k, v in result.heldout_metrics.items()},
        "l2e_enabled": cfg.l2e_active,
        "inhibited_layers": cfg.inhibited_layers() if cfg.l2e_active else [],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print()
    print("== demo summary ==")
    if summary["first_train_loss"] is not None:
        print(
            f"train loss      first step {summary['first_train_loss']:.3f} "
            f"-> last step {summary['last_train_loss']:.3f} "
            f"(mean of last 10: {summary['last10_train_loss']:.3f})"
        )
    if summary["valid_loss"] is not None:
        print(
            f"valid loss      {summary['valid_loss']:.3f} (ppl {math.exp(summary['valid_loss']):.1f}) at step "
            f"{result.valid_losses[-1][0]}"
        )
    print(
        f"throughput      {result.tokens_per_s:,.0f} tokens/s | {result.iteration - result.start_iteration} steps in "
        f"{result.elapsed_s:.0f} s (total with data preparation {elapsed:.0f} s)"
    )
    if result.l2e_metrics:
        print(
            f"L2E             {cfg.l2e.l2e_method} on layers {summary['inhibited_layers']} "
            f"(p = {cfg.l2e.l2e_ratio:g}, lambda = {cfg.l2e.l2e_lambda:g}, {cfg.l2e.l2e_loss_reduction})"
        )
    elif not cfg.l2e_active:
        print("L2E             off (baseline: the held-out measure below is the comparison column)")
    for line in monosemanticity_table(
        result.heldout_metrics, result.l2e_metrics, summary["inhibited_layers"], cfg.l2e.l2e_reference_levels or []
    ):
        print(line)
    print(
        f"outputs         {out}/ (metrics.jsonl, tensorboard/, checkpoints/, "
        f"{'loss.png, ' if plotted else ''}summary.json)"
    )
    return 130 if result.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
