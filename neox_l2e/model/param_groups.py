"""The model's optimizer parameter groups: which parameters get weight decay (NeoX's rule).

Used by the training engine to build AdamW and by the checkpoint resharder to name the optimizer state of a
saved run, so both see the same grouping."""

from __future__ import annotations

import torch


def no_weight_decay(name: str, p: torch.Tensor) -> bool:
    """Biases, LayerNorm parameters and any other 1-D parameter are not decayed (as NeoX)."""
    return p.ndim < 2 or name.endswith(".bias") or "norm" in name


def param_groups(model: torch.nn.Module, weight_decay: float) -> list:
    """Two AdamW groups: weights with decay; biases and LayerNorm parameters without (as NeoX)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if no_weight_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups
