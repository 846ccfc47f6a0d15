"""The model's one L2E door for the training loop: begin a step, the loss term, end a micro-batch, metrics.

    l2e = model.l2e                              # L2EController (None-safe: a model without L2E has none)
    l2e.begin_step(iteration)
    out = model(tokens); loss = lm + l2e.loss_term()         # lambda x the reduced L2E loss (or 0-dim 0)
    backward(loss)
    l2e.end_micro_batch(ok)                      # commit every layer (ok) or drop the micro-batch (NaN/inf)
    l2e.metrics()                                # {layer: {key: float}} since the last call (collective)

Loss reductions (``l2e-loss-reduction``; docs/l2e.md "Loss reduction"):
    selected-mean  mean over the layers that selected of (mean over that layer's selected entries of L_MS)
    token-sum      (sum over layers and selected entries of L_MS) / tokens of this rank, like the per-token LM loss
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Sequence

import torch

REDUCTIONS = ("selected-mean", "token-sum")


def total_loss(inhibitors: Iterable, reduction: str = "token-sum") -> Optional[torch.Tensor]:
    """The L2E loss of the last forward (no host synchronisation); None when no layer could select.

    selected-mean: sum of the layers' mean L_MS / number of layers with n_selected > 0 (a layer with none
    adds 0). token-sum: sum of the layers' TP-global L_MS sums / the layers' token rows."""
    active = [inh for inh in inhibitors if inh.loss is not None and inh.n_selected is not None]
    if not active:
        return None
    if reduction == "selected-mean":
        has = torch.stack([(inh.n_selected > 0).to(torch.float32) for inh in active])
        return torch.stack([inh.loss for inh in active]).sum() / has.sum().clamp_min(1.0)
    if reduction == "token-sum":
        return torch.stack([inh.loss_sum for inh in active]).sum() / float(max(active[0].rows, 1))
    raise ValueError(f"l2e-loss-reduction must be one of {REDUCTIONS}, got {reduction!r}")


def commit_devices(inhibitors: Sequence, ok: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """Device part of every inhibitor's commit, in the given (rank-identical) order; returns their host values
    concatenated (fp64 [2 x layers with something pending]) or None. Pass them to ``finish_commits``."""
    vals = [inh.commit_device(ok) for inh in inhibitors]
    vals = [v for v in vals if v is not None]
    return torch.cat(vals) if vals else None


def finish_commits(inhibitors: Sequence, values: Optional[List[float]], ok: bool = True) -> None:
    """Host part of the commits started by ``commit_devices`` (``values``: its result as a list)."""
    i = 0
    for inh in inhibitors:
        if inh._committing is not None:
            inh.commit_host(values[i : i + 2], ok)
            i += 2


def commit_all(inhibitors: Sequence) -> None:
    """commit() every inhibitor (in the given, rank-identical order) with one host synchronisation."""
    inhibitors = list(inhibitors)
    vals = commit_devices(inhibitors)
    finish_commits(inhibitors, vals.tolist() if vals is not None else None)


def metrics_all(inhibitors: Iterable, prefix: str = "l2e_train") -> dict:
    """metrics() of every inhibitor as one flat dict: '<prefix>/layer<i>/<key>'."""
    return {f"{prefix}/layer{inh.layer_index}/{k}": v for inh in inhibitors for k, v in inh.metrics().items()}


class L2EController:
    """The inhibitors of one model, the loss weight lambda and the reduction; what the training loop calls."""

    def __init__(self, inhibitors: Sequence, lam: float, reduction: str = "token-sum"):
        self.inhibitors = list(inhibitors)
        self.lam = float(lam)
        self.reduction = reduction

    def __bool__(self) -> bool:
        return bool(self.inhibitors)

    def begin_step(self, step: int) -> None:
        """The optimizer step about to run (no selection before l2e-warmup-steps)."""
        for inh in self.inhibitors:
            inh.set_step(step)

    def loss(self) -> Optional[torch.Tensor]:
        """The reduced L2E loss of the last forward (unweighted), or None."""
        return total_loss(self.inhibitors, self.reduction)

    def loss_term(self, loss: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """lambda x ``loss`` (default: ``self.loss()``), or None when there is no L2E loss."""
        loss = self.loss() if loss is None else loss
        return None if loss is None else self.lam * loss

    def end_micro_batch_device(self, ok: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """Commit every layer on the device (``ok``: 0-dim bool, False drops the micro-batch); returns the
        fp64 values the host must read (None when nothing was pending). Collective: every rank calls it."""
        return commit_devices(self.inhibitors, ok)

    def end_micro_batch_host(self, values: Optional[List[float]], ok: bool) -> None:
        """Finish ``end_micro_batch_device`` with its values read on the host, and ``ok`` as the host knows it."""
        finish_commits(self.inhibitors, values, ok)
        if not ok:
            for inh in self.inhibitors:
                inh.discard()

    def end_micro_batch(self, ok: bool = True) -> None:
        """Commit every layer (ok) or drop the micro-batch (False: a NaN/inf loss). One host synchronisation."""
        if not ok:
            for inh in self.inhibitors:
                inh.discard()
            return
        commit_all(self.inhibitors)

    def metrics(self) -> dict:
        """{layer index: {key: float}} since the last call; a collective over TP and DP (every rank)."""
        return {inh.layer_index: {k: float(v) for k, v in inh.metrics().items()} for inh in self.inhibitors}
