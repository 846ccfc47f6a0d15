"""What one inhibitor forward does: its phase (from the layer's state), its pass (first, recompute, eval),
and what a training forward leaves pending for ``commit``.

    Phase.GATHER    statistics only: neurons not eligible yet, or warm-up
    Phase.INIT_TAU  L2E's first eligible batch: statistics + phi, tau set from its exact quantile at commit
    Phase.SELECT    statistics + selection (L2E: phi >= tau and the loss; MEmeL: top-k reflected)

    Pass.FIRST      the micro-batch's training forward: gathers moments, records loss/metrics, leaves Pending
    Pass.RECOMPUTE  a second training forward before commit (activation checkpointing): the same z and saved tensors,
                    no side effects; it reuses the first forward's selection (Pending.selection) instead of
                    scoring and selecting again
    Pass.EVAL       eval mode: nothing pending; no statistics path where nothing is selected
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional

import torch

from .metrics import BatchMetrics


class Phase(enum.Enum):
    GATHER = "gather"
    INIT_TAU = "init-tau"
    SELECT = "select"


class Pass(enum.Enum):
    FIRST = "first"
    RECOMPUTE = "recompute"
    EVAL = "eval"


@dataclass
class Pending:
    """A training micro-batch's contribution, kept from its forward until commit (or discard)."""

    rows: int  # token rows T of this rank
    phase: Phase
    moments: tuple  # (count, mean [N], M2 [N]) of this batch's z, fp32
    n_selected: Optional[torch.Tensor] = None  # selected activations of this rank (None: not selecting)
    n_eligible: float = 0.0  # T x N when the phase scores, else 0
    init_phi: Optional[torch.Tensor] = None  # INIT_TAU with a quantile init: this rank's phi
    metrics: Optional[BatchMetrics] = None  # selecting micro-batches only
    selection: Optional[torch.Tensor] = None  # the first forward's selection, reused by a checkpointing recompute
