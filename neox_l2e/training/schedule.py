"""The NeoX learning-rate schedule (Megatron's AnnealingLR), as a function of completed steps.

    warmup_iters = int(warmup * decay_iters)               decay_iters = lr-decay-iters or train-iters
    it <= warmup_iters (warmup_iters > 0):  lr = peak * it / warmup_iters
    afterwards, with t = it - warmup_iters and T = decay_iters - warmup_iters:
      cosine:   lr = min_lr + (peak - min_lr) / 2 * (cos(pi * t / T) + 1)
      linear:   lr = peak * (T - t) / T
      constant: lr = peak
    and finally lr = max(lr, min_lr)     (so past decay_iters the lr stays at min_lr)

`it` is the number of optimizer steps already applied; step k (1-based) runs with lr(k - 1), as in
NeoX, where the scheduler is stepped after each optimizer step. Steps skipped for a NaN/inf loss or an
fp16 overflow do not advance the schedule (DeepSpeed steps the NeoX scheduler only on applied steps).
"""
from __future__ import annotations

import math


def neox_lr(it: int, peak: float, min_lr: float, decay_iters: int, warmup_iters: int, style: str) -> float:
    """Learning rate after `it` applied steps (the NeoX/Megatron AnnealingLR formulas)."""
    if warmup_iters > 0 and it <= warmup_iters:
        return float(peak) * it / warmup_iters
    t = it - warmup_iters
    T = decay_iters - warmup_iters
    if style == "cosine":
        lr = min_lr + (peak - min_lr) / 2.0 * (math.cos(math.pi * t / T) + 1) if T > 0 else min_lr
    elif style == "linear":
        lr = peak * (T - t) / T if T > 0 else min_lr
    elif style == "constant":
        lr = peak
    else:
        raise ValueError(f"unknown lr-decay-style {style!r}")
    return max(lr, min_lr)


class AnnealingLR:
    """Stateful wrapper: sets the lr of every param group; state_dict() goes into checkpoints."""

    def __init__(self, optimizer, peak: float, min_lr: float, decay_iters: int, warmup: float, style: str,
                 num_iters: int = 0):
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
        return neox_lr(self.num_iters if it is None else it, self.peak, self.min_lr, self.decay_iters,
                       self.warmup_iters, self.style)

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
        return {"num_iters": self.num_iters, "peak": self.peak, "min_lr": self.min_lr, "decay_iters": self.decay_iters,
                "warmup_iters": self.warmup_iters, "style": self.style}

    def load_state_dict(self, sd: dict) -> None:
        self.num_iters = int(sd["num_iters"])
        self.apply()
