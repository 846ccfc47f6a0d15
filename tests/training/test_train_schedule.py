"""The learning-rate schedule follows GPT-NeoX's AnnealingLR formulas (the Pythia schedule), quirks included."""

import math

import pytest
import torch

from neox_l2e.training.schedule import AnnealingLR, neox_lr


def _reference(it, peak, min_lr, decay, warmup_frac, style):
    # GPT-NeoX megatron/learning_rates.py AnnealingLR.get_lr, transcribed independently
    w = int(warmup_frac * decay)
    num = min(it, decay - w)
    if w > 0 and it <= w:
        return peak * num / w
    num -= w
    if style == "linear":
        lr = peak * (decay - num) / decay
    elif style == "cosine":
        lr = peak / 2.0 * (math.cos(math.pi * num / decay) + 1)
    else:
        lr = peak
    return max(lr, min_lr)


@pytest.mark.parametrize("style", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup", [0.0, 0.01, 0.1])
def test_formulas(style, warmup):
    peak, min_lr, decay = 6e-4, 6e-5, 1000
    for it in list(range(0, 30)) + [100, 499, 500, 501, 999, 1000, 1001, 5000]:
        got = neox_lr(it, peak, min_lr, decay, int(warmup * decay), style)
        assert got == pytest.approx(_reference(it, peak, min_lr, decay, warmup, style), rel=1e-12, abs=1e-15)


def test_key_points():
    # warmup starts at 0 and peaks at the end of warmup; the cosine runs over decay-iters with min-lr as a
    # floor, and the lr freezes after decay-iters - warmup steps (NeoX's clamp)
    assert neox_lr(0, 1.0, 0.1, 100, 10, "cosine") == 0.0
    assert neox_lr(5, 1.0, 0.1, 100, 10, "cosine") == 0.5
    assert neox_lr(10, 1.0, 0.1, 100, 10, "cosine") == 1.0
    assert neox_lr(60, 1.0, 0.1, 100, 10, "cosine") == pytest.approx(0.5)  # t = 50 = T/2
    assert neox_lr(90, 1.0, 0.0, 100, 10, "cosine") == pytest.approx((math.cos(math.pi * 0.8) + 1) / 2)
    assert neox_lr(1000, 1.0, 0.0, 100, 10, "cosine") == neox_lr(90, 1.0, 0.0, 100, 10, "cosine")
    assert neox_lr(95, 1.0, 0.3, 100, 0, "cosine") == 0.3  # floored at min-lr
    assert neox_lr(50, 1.0, 0.3, 100, 0, "linear") == 0.5
    assert neox_lr(90, 1.0, 0.3, 100, 0, "linear") == 0.3
    assert neox_lr(77, 1.0, 0.3, 100, 5, "constant") == 1.0


def test_annealing_sets_param_groups_and_round_trips():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [p]}, {"params": [], "weight_decay": 0.0}], lr=123.0)
    s = AnnealingLR(opt, peak=1e-3, min_lr=1e-4, decay_iters=50, warmup=0.1, style="cosine")
    assert s.warmup_iters == 5 and all(g["lr"] == 0.0 for g in opt.param_groups)
    for _ in range(7):
        s.step()
    assert all(g["lr"] == pytest.approx(neox_lr(7, 1e-3, 1e-4, 50, 5, "cosine")) for g in opt.param_groups)
    s2 = AnnealingLR(opt, peak=1e-3, min_lr=1e-4, decay_iters=50, warmup=0.1, style="cosine")
    s2.load_state_dict(s.state_dict())
    assert s2.num_iters == 7 and s2.get_lr() == s.get_lr()


def test_from_config_uses_lr_decay_iters_or_train_iters():
    from train_common import tiny_cfg

    cfg = tiny_cfg(train_iters=40, warmup=0.1, lr_decay_style="linear")
    s = AnnealingLR.from_config(None, cfg)
    assert (s.decay_iters, s.warmup_iters, s.style, s.peak) == (40, 4, "linear", cfg.lr)
    s = AnnealingLR.from_config(None, tiny_cfg(train_iters=40, lr_decay_iters=100))
    assert s.decay_iters == 100
