"""Run logging on rank 0: the resolved config, header lines, a tqdm progress bar, metrics.jsonl, TensorBoard,
optional W&B.

The resolved config goes to <log-dir>/config.yml and to TensorBoard as text ("config"); the keys the files and
overrides set are printed once at the start. metrics.jsonl holds one strict-JSON object per line:
{"kind": "train"|"valid"|"run"|"ms_heldout_hist", "iteration": N, ...}; a NaN / inf value is written as null and
named in "nonfinite" ({"lm_loss": "nan"}). L2E metrics against the inhibitor's running statistics appear as
"l2e_train/layer{i}/{key}", monosemanticity on the fixed held-out set (neox_l2e.l2e.heldout) as
"ms_heldout/layer{i}/{key}". TensorBoard and W&B get GPT-NeoX's tag names where NeoX has one (``tag``:
train/lm_loss, train/learning_rate, validation/lm_loss, ...); keys with their own group keep it.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional


def fmt_count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def fmt_time(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


# metrics.jsonl key -> TensorBoard / W&B tag, per record kind: GPT-NeoX's names where it logs the same quantity
NEOX_TAGS = {
    "train": {
        "lm_loss": "train/lm_loss",
        "lr": "train/learning_rate",
        "loss_scale": "train/loss_scale",
        "step_time_s": "runtime/iteration_time",
        "tokens_per_s": "runtime/tokens_per_sec",
    },
    "valid": {"lm_loss": "validation/lm_loss", "ppl": "validation/lm_loss_ppl"},
}
KIND_PREFIX = {"valid": "validation"}


def tag(kind: str, key: str) -> str:
    """The TensorBoard / W&B tag of a metrics.jsonl key: NeoX's name (NEOX_TAGS), a key that already has a
    group (l2e/..., timers/...) as it is, else "<kind>/<key>" (validation/ for valid)."""
    if key in NEOX_TAGS.get(kind, {}):
        return NEOX_TAGS[kind][key]
    if "/" in key:
        return key
    return f"{KIND_PREFIX.get(kind, kind)}/{key}"


def strict_json_record(rec: dict) -> dict:
    """rec with NaN / inf numbers replaced by null and listed under "nonfinite" (key -> "nan" / "inf" / "-inf"),
    so the line is strict JSON (no NaN / Infinity literals)."""
    out, bad = {}, {}
    for k, v in rec.items():
        if isinstance(v, float) and not math.isfinite(v):
            bad[k] = "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
            v = None
        out[k] = v
    if bad:
        out["nonfinite"] = bad
    return out


def _value(v) -> str:
    """A config value as a yml reader writes it (true, null, [0.9, 0.95], {"stage": 1}); strings bare."""
    return v if isinstance(v, str) else json.dumps(v, default=str)


def config_lines(cfg, config_file: Optional[Path]) -> list:
    """The keys the config files and overrides set, by section, one aligned "key  value  (source)" line each."""
    import dataclasses

    from ..config.schema import SECTIONS

    where = (
        f"every key, defaults included, in {config_file}"
        if config_file
        else "the whole config is not written: no log-dir or save is set"
    )
    lines = [f"config (keys set by the files and overrides; {where}):"]
    rows = []
    for section in SECTIONS:
        obj = getattr(cfg, section)
        for f in dataclasses.fields(obj):
            if f.name in cfg.sources:
                rows.append((section, f.name.replace("_", "-"), _value(getattr(obj, f.name)), cfg.sources[f.name]))
    width = max((len(r[1]) for r in rows), default=0)
    last = None
    for section, key, value, source in rows:
        if section != last:
            lines.append(f"  [{section}]")
            last = section
        lines.append(f"    {key.ljust(width)}  {value}  ({source})")
    return lines


class Monitor:
    """Everything the user sees. Only the main rank writes; other ranks get a silent instance."""

    def __init__(
        self, cfg, log_dir: Optional[str], enabled: bool = True, total_iters: int = 0, start_iter: int = 0, stream=None
    ):
        self.enabled = enabled
        self.cfg = cfg
        self.stream = stream or sys.stdout
        self.log_dir = Path(log_dir) if log_dir else None
        self._jsonl = None
        self._tb = None
        self._wandb = None
        self._bar = None
        self.total, self.start = total_iters, start_iter
        self.config_file: Optional[Path] = None
        if not enabled:
            return
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self.config_file = self.log_dir / "config.yml"
            self.config_file.write_text(cfg.to_yaml())
            self._jsonl = open(self.log_dir / "metrics.jsonl", "a", buffering=1)
            tb_dir = cfg.logging.tensorboard_dir or str(self.log_dir / "tensorboard")
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(tb_dir)
                # markdown: a 4-space indent keeps the yml a code block
                self._tb.add_text("config", "\n".join("    " + line for line in cfg.to_yaml().splitlines()), start_iter)
            except ImportError:  # tensorboard not installed: metrics.jsonl still has everything
                self._tb = None
        if cfg.logging.use_wandb:
            if cfg.logging.wandb_host:  # a self-hosted W&B server: wandb reads it at init
                os.environ["WANDB_BASE_URL"] = cfg.logging.wandb_host
            try:
                import wandb

                self._wandb = wandb.init(
                    project=cfg.logging.wandb_project,
                    group=cfg.logging.wandb_group,
                    entity=cfg.logging.wandb_team,
                    config=cfg.to_dict(),
                )
            except ImportError:
                self.print(
                    "warning: use-wandb is set but wandb is not installed; "
                    "logging to metrics.jsonl and TensorBoard only"
                )
            except Exception as e:  # noqa: BLE001 - W&B problems never stop training
                self.print(f"warning: W&B disabled ({str(e).splitlines()[0][:120]})")
                self._wandb = None

    # ---------------------------------------------------------------- text
    def print(self, line: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def header(self, lines: list) -> None:
        """The config (once, at the start) and then the run's header lines."""
        if not self.enabled:
            return
        for line in config_lines(self.cfg, self.config_file) + lines:
            self.print(line)

    # ---------------------------------------------------------------- progress bar
    def start_bar(self) -> None:
        if not self.enabled or not self.cfg.logging.progress_bar:
            return
        from tqdm import tqdm

        tty = bool(getattr(self.stream, "isatty", lambda: False)())
        # on a terminal the bar redraws twice a second; in a log file a line every 30 s is enough
        self._bar = tqdm(
            total=self.total,
            initial=self.start,
            unit="step",
            file=self.stream,
            dynamic_ncols=True,
            mininterval=0.5 if tty else 30.0,
            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}] {postfix}",
        )

    def update_bar(
        self, iteration: int, loss: float, lr: float, tokens_per_s: float, step_time: float, eta_s: float
    ) -> None:
        if self._bar is None:
            return
        self._bar.set_postfix_str(
            f"loss {loss:.4f} lr {lr:.2e} {fmt_count(tokens_per_s)} tok/s "
            f"{step_time * 1000:.0f} ms/step ETA {fmt_time(eta_s)}",
            refresh=False,
        )
        self._bar.update(iteration - self._bar.n)  # redraws at most every mininterval

    # ---------------------------------------------------------------- metrics
    def log(self, kind: str, iteration: int, metrics: dict) -> None:
        if not self.enabled:
            return
        rec = {"kind": kind, "iteration": iteration, "time": round(time.time(), 3)}
        rec.update(
            {
                k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
                for k, v in metrics.items()
            }
        )
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(strict_json_record(rec), default=str, allow_nan=False) + "\n")
        scalars = {
            tag(kind, k): v
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
        }
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, iteration)
        if self._wandb is not None:
            self._wandb.log(scalars, step=iteration)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
