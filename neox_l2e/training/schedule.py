"""The NeoX learning-rate schedule (GPT-NeoX's AnnealingLR, the one Pythia was trained with).

With W = int(warmup * T_end) warmup steps, T_end = lr-decay-iters (default train-iters) and
n = min(it, T_end - W):
    it <= W (W > 0):  lr = peak * n / W
    otherwise, with t = n - W:
      cosine:   lr = peak / 2 * (cos(pi * t / T_end) + 1)
      linear:   lr = peak * (T_end - t) / T_end
      constant: lr = peak
    lr = max(lr, min_lr)

These are NeoX's formulas verbatim, quirks included: the cosine is taken over T_end (not T_end - W),
has no min-lr offset (min-lr is a floor), and the clamp n <= T_end - W freezes the lr after
T_end - W steps. `it` counts optimizer steps already applied: step k (1-based) runs with lr(k - 1),
as in NeoX, whose scheduler DeepSpeed steps after each applied optimizer step. Steps skipped for a
NaN/inf loss or an fp16 overflow therefore do not advance the schedule.
"""

from __future__ import annotations

import math


def neox_lr(it: int, peak: float, min_lr: float, decay_iters: int, warmup_iters: int, style: str) -> float:
    """Learning rate after `it` applied steps (NeoX's AnnealingLR.get_lr)."""
    n = min(it, decay_iters - warmup_iters)
    if warmup_iters > 0 and it <= warmup_iters:
        return float(peak) * n / warmup_iters
    t = n - warmup_iters
    if style == "cosine":
        lr = peak / 2.0 * (math.cos(math.pi * t / decay_iters) + 1)
    elif style == "linear":
        lr = peak * (decay_iters - t) / decay_iters
    elif style == "constant":
        lr = peak
    else:
        raise ValueError(f"unknown lr-decay-style {style!r}")
    return max(lr, min_lr)


class AnnealingLR:
    """Stateful wrapper: sets the lr of every param group; state_dict() goes into checkpoints."""

    def __init__(
        self, optimizer, peak: float, min_lr: float, decay_iters: int, warmup: float, style: str, num_iters: int = 0
    ):
        self.optimizer = optimizer
        self.peak, self.min_lr, self.style = float(peak), float(min_lr), style
        self.decay_iters = int(decay_iters)
        self.warmup_iters = int(warmup * self.decay_iters)
        self.num_iters = int(num_iters)
        self.apply()

    @classmethod
    def from_config(cls, optimizer, cfg, num_iters: int = 0) -> "AnnealingLR":
        o = cfg.optimizer
        decay = o.lr_decay_iters or cfg.training.train_iters
        return cls(optimizer, cfg.lr, o.min_lr, decay, o.warmup, o.lr_decay_style, num_iters)

    def get_lr(self, it=None) -> float:
        return neox_lr(
            self.num_iters if it is None else it,
            self.peak,
            self.min_lr,
            self.decay_iters,
            self.warmup_iters,
            self.style,
        )

    def apply(self) -> float:
        lr = self.get_lr()
        if self.optimizer is not None:
            for g in self.optimizer.param_groups:
                g["lr"] = lr
        return lr

    def step(self) -> float:
        """Count one applied optimizer step and set the lr for the next one."""
        self.num_iters += 1
        return self.apply()

    def state_dict(self) -> dict:
        return {
            "num_iters": self.num_iters,
            "peak": self.peak,
            "min_lr": self.min_lr,
            "decay_iters": self.decay_iters,
            "warmup_iters": self.warmup_iters,
            "style": self.style,
        }

    def load_state_dict(self, sd: dict) -> None:
        self.num_iters = int(sd["num_iters"])
        self.apply()
