"""Per-layer L2E metrics against the running statistics: one micro-batch's device-side sums, the window
they are added to between two ``metrics()`` calls, and the global (TP x DP) reduction to python floats.

No host synchronisation until ``MetricsWindow.reduce`` (one device-to-host copy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Optional, Sequence

import torch

from . import functional


@dataclass
class BatchMetrics:
    """Sums of one selecting micro-batch (0-dim fp64 device tensors unless noted)."""

    eligible: torch.Tensor  # eligible activations (T x N of this rank)
    selected: torch.Tensor  # selected activations (exact)
    scored: torch.Tensor  # activations whose phi was scored (all of them, or the row sample)
    phi_sum: torch.Tensor  # sum of phi over the scored ones
    phi_sum_selected: torch.Tensor  # sum of phi over the selected among the scored
    selected_scored: torch.Tensor  # selected among the scored
    above_levels: torch.Tensor  # [levels] scored activations with phi > level
    hit: torch.Tensor  # [N] bool: neuron selected at least once (among the scored)
    loss_sum: torch.Tensor  # this layer's L_MS (TP-global mean over selected); 0 when none
    loss_batches: torch.Tensor  # 1 when the micro-batch had an L2E loss, else 0

    #: the fields summed over TP and DP ranks, in this order
    SUMMED = ("eligible", "selected", "scored", "phi_sum", "phi_sum_selected", "selected_scored")

    @classmethod
    def of(
        cls,
        phi: torch.Tensor,
        mask: torch.Tensor,
        n_sel: torch.Tensor,
        rows: int,
        num_neurons: int,
        levels: Sequence[float],
        loss: Optional[torch.Tensor],
    ) -> "BatchMetrics":
        """From this rank's scored phi [t, N] and its selection ``mask``, the exact ``n_sel`` over all ``rows``."""
        dev = phi.device
        f64 = dict(dtype=torch.float64, device=dev)
        return cls(
            eligible=torch.full((), float(rows * num_neurons), **f64),  # fills: no host-to-device copy
            selected=n_sel.detach().to(torch.float64).reshape(()),
            scored=torch.full((), float(phi.numel()), **f64),
            phi_sum=phi.sum().to(torch.float64),
            phi_sum_selected=torch.where(mask, phi, 0.0).sum().to(torch.float64),
            selected_scored=functional.count(mask),
            above_levels=torch.stack([functional.count(phi > lv) for lv in levels])
            if levels
            else torch.zeros(0, **f64),
            hit=mask.any(dim=0),
            loss_sum=loss.detach().to(torch.float64).reshape(()) if loss is not None else torch.zeros((), **f64),
            loss_batches=torch.full((), 1.0 if loss is not None else 0.0, **f64),
        )

    @classmethod
    def of_selection(cls, r, n_sel: torch.Tensor, rows: int, num_neurons: int, levels, loss) -> "BatchMetrics":
        """The same sums from the gather form of the torch path (``torch_op.L2EForward`` with ``sel``, made by
        ``functional.scan``): ``phi_sum``, the selection's own values for the selected sums and ``neurons_hit``,
        ``cand_phi`` (every phi >= its bound, <= every level when given) for the level counts. Equal to ``of`` up
        to summation order."""
        dev = r.sel.device
        f64 = dict(dtype=torch.float64, device=dev)
        if levels and r.cand_phi is not None:
            above = torch.stack([torch.count_nonzero(r.cand_phi > lv) for lv in levels]).to(torch.float64)
        elif levels:  # the top-k's fallback: no candidates, but the full phi
            above = torch.stack([functional.count(r.phi > lv) for lv in levels])
        else:
            above = torch.zeros(0, **f64)
        hit = torch.zeros(num_neurons, dtype=torch.bool, device=dev)
        hit.index_fill_(0, r.sel.remainder(num_neurons), True)
        return cls(
            eligible=torch.full((), float(rows * num_neurons), **f64),
            selected=n_sel.detach().to(torch.float64).reshape(()),
            scored=torch.full((), float(rows * num_neurons), **f64),
            phi_sum=r.phi_sum.to(torch.float64),
            phi_sum_selected=r.sel_phi.sum().to(torch.float64),
            selected_scored=torch.full((), float(r.sel.numel()), **f64),
            above_levels=above,
            hit=hit,
            loss_sum=loss.detach().to(torch.float64).reshape(()) if loss is not None else torch.zeros((), **f64),
            loss_batches=torch.full((), 1.0 if loss is not None else 0.0, **f64),
        )


@dataclass
class MetricsWindow:
    """Running sums of the committed micro-batches since the last ``reduce``."""

    num_neurons: int
    levels: Sequence[float]
    device: torch.device
    batches: int = 0
    sums: dict = field(default_factory=dict)

    def add(self, b: BatchMetrics) -> None:
        self.batches += 1
        for f in fields(BatchMetrics):
            v = getattr(b, f.name)
            old = self.sums.get(f.name)
            self.sums[f.name] = v.clone() if old is None else (old | v if f.name == "hit" else old + v)

    def _get(self, name: str) -> torch.Tensor:
        if name in self.sums:
            return self.sums[name]
        f64 = dict(dtype=torch.float64, device=self.device)
        if name == "hit":
            return torch.zeros(self.num_neurons, dtype=torch.bool, device=self.device)
        return torch.zeros(len(self.levels), **f64) if name == "above_levels" else torch.zeros((), **f64)

    def reduce(self, ps, tau: float) -> dict:
        """Global metrics of the window as python floats (collective over TP and DP; call on every rank).

        frac_selected = selected / eligible; tau; loss_ms = mean L_MS over micro-batches that had a loss;
        phi_mean_selected, phi_mean_all (over the scored activations); frac_phi_gt_<level>; neurons_hit =
        neurons of the whole layer selected at least once on any DP rank; batches = selecting micro-batches.
        """
        names = list(BatchMetrics.SUMMED)
        summed = torch.cat([torch.stack([self._get(n) for n in names]), self._get("above_levels")])
        ps.all_reduce_tp(summed)
        ps.all_reduce_dp(summed)
        hit = self._get("hit").to(torch.float64)
        ps.all_reduce_dp(hit, op=torch.distributed.ReduceOp.MAX)
        hits = hit.sum().reshape(1)
        ps.all_reduce_tp(hits)
        loss = torch.stack([self._get("loss_sum"), self._get("loss_batches")])
        ps.all_reduce_dp(loss)  # the layer's loss is already TP-global
        values = torch.cat([summed, hits, loss]).tolist()
        v = dict(zip(names, values))
        above = values[len(names) : len(names) + len(self.levels)]
        n_hit, loss_sum, loss_n = values[-3:]
        nan = math.nan
        scored = v["scored"]
        out = {
            "frac_selected": v["selected"] / v["eligible"] if v["eligible"] > 0 else nan,
            "tau": tau,
            "loss_ms": loss_sum / loss_n if loss_n > 0 else nan,
            "phi_mean_selected": (v["phi_sum_selected"] / v["selected_scored"] if v["selected_scored"] > 0 else nan),
            "phi_mean_all": v["phi_sum"] / scored if scored > 0 else nan,
            "neurons_hit": n_hit,
            "batches": float(self.batches),
        }
        for level, c in zip(self.levels, above):
            out[f"frac_phi_gt_{level:g}"] = c / scored if scored > 0 else nan
        return out
