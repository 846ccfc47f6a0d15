"""The moving threshold tau of one L2E layer: initial value and the log-space quantile-tracking update.

    tau_0    = exact (1 - p) quantile of phi of the first eligible batch (over all TP and DP ranks), or a number
    log tau += eta * (frac - p) / p           after every committed micro-batch that selected

Everything runs on the device (no host synchronisation); the inhibitor mirrors the result on the host.
tau stays in [TAU_MIN, TAU_MAX] once initialised and is stored in fp32.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from . import stats

TAU_MIN, TAU_MAX = 1e-30, 1e30


class Threshold:
    """tau's rules for target ratio ``ratio`` (p), step ``eta`` and ``tau_init`` ('quantile' or a number)."""

    def __init__(self, ratio: float, eta: float, tau_init: Union[str, float, None]):
        self.ratio = float(ratio)
        self.eta = float(eta)
        self.from_quantile = tau_init in (None, "quantile")
        self.tau_init = None if self.from_quantile else float(tau_init)

    def initial(self, phi: Optional[torch.Tensor], n_eligible: torch.Tensor, ps) -> torch.Tensor:
        """tau_0 as a 0-dim fp64 tensor. ``phi``: this rank's scores of the initialising batch (quantile
        mode); ``n_eligible``: the eligible activations of that batch summed over all ranks (0-dim fp64).
        Collective over TP and DP in quantile mode (a bisection of one-element all-reduces)."""
        if not self.from_quantile:
            return torch.full((), self.tau_init, dtype=torch.float64, device=n_eligible.device)
        k = torch.round(self.ratio * n_eligible).clamp_min(1.0).to(torch.int64)  # = stats.kth_index

        def _reduce(t):
            ps.all_reduce_tp(t)
            ps.all_reduce_dp(t)
            return t

        return stats.global_kth_largest(phi, k, _reduce if ps.world_size > 1 else None).to(torch.float64)

    def updated(self, tau: torch.Tensor, n_selected: torch.Tensor, n_eligible: torch.Tensor) -> torch.Tensor:
        """tau * exp(eta * (frac - p) / p), frac = n_selected / n_eligible (fp64 0-dim tensors); tau itself
        where nothing was eligible."""
        frac = n_selected / n_eligible.clamp_min(1.0)
        new = tau.to(torch.float64) * torch.exp(self.eta * (frac - self.ratio) / self.ratio)
        return torch.where(n_eligible > 0, new, tau.to(torch.float64))

    @staticmethod
    def stored(tau: torch.Tensor) -> torch.Tensor:
        """The fp32 value kept in the buffer: clamped to [TAU_MIN, TAU_MAX] (a 0-dim fp64 input)."""
        return tau.clamp(TAU_MIN, TAU_MAX).to(torch.float32)
