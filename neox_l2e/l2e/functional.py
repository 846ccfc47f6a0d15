"""The L2E math in plain PyTorch, element by element (``torch_op`` composes it into the MLP forward).

Shapes: z is [T, N] (T token positions, N neurons of this TP rank), statistics are [N] in fp32.

    phi(z)      = (z - mean)^2 * inv_var              inv_var = 1 / max(var, VAR_FLOOR) for eligible
                                                      neurons, 0 otherwise (so phi = 0: never selected)
    selected    = phi >= tau                          (tau > 0; tau = inf before it is initialised)
    loss_sum    = sum over selected of log((z - mean)^2 + eps)
    d loss_sum / dz = selected * 2 (z - mean) / ((z - mean)^2 + eps)      (= 2 / (z - mean) at eps = 0)

mean and inv_var are constants: no gradient reaches the statistics. All of it in fp32.
Statistics are (count, mean, M2) per neuron; batches are folded in with Chan's parallel merge,
never from raw sums (sum x^2 - n mean^2 cancels for near-constant neurons).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

VAR_FLOOR = 1e-12


def inv_var_from_stats(count: torch.Tensor, m2: torch.Tensor, min_samples: int) -> torch.Tensor:
    """1 / unbiased variance per neuron, 0 where the neuron has fewer than ``min_samples`` samples.

    count: [N] (or scalar) fp32/fp64 sample counts; m2: [N] sums of squared deviations.
    """
    count = count.to(torch.float32)
    m2 = m2.to(torch.float32)
    var = m2 / (count - 1.0).clamp_min(1.0)
    eligible = count >= max(int(min_samples), 2)
    return torch.where(eligible, 1.0 / var.clamp_min(VAR_FLOOR), torch.zeros_like(var))


def phi(z: torch.Tensor, mean: torch.Tensor, inv_var: torch.Tensor) -> torch.Tensor:
    """Monosemanticity score per (token, neuron), fp32: (z - mean)^2 * inv_var (not differentiable)."""
    d = z.detach().float() - mean
    return d.mul_(d).mul_(inv_var)  # in place: one [T, N] buffer, the same bits as d * d * inv_var


def select(z: torch.Tensor, mean: torch.Tensor, inv_var: torch.Tensor, tau) -> torch.Tensor:
    """Boolean [T, N] mask of activations at or above the threshold."""
    return phi(z, mean, inv_var) >= tau


def inhibition_loss_sum(z: torch.Tensor, mean: torch.Tensor, mask: torch.Tensor, eps: float) -> torch.Tensor:
    """Sum over selected entries of log((z - mean)^2 + eps) (fp32 scalar, differentiable in z only).

    On CPU the selected entries (about p of them) are gathered and only they are computed, forward and
    backward; elsewhere the masked full-size form is used, because gathering needs the number of selected
    entries on the host (a device synchronisation per layer and forward). Same value up to summation order.
    """
    if z.device.type == "cpu":
        rows, cols = mask.reshape(-1, mask.shape[-1]).nonzero(as_tuple=True)
        d = z.reshape(-1, z.shape[-1])[rows, cols].float() - mean.detach()[cols]
        return torch.log(d * d + eps).sum()
    d = z.float() - mean.detach()
    # log of 1 (= 0) on unselected entries, so their gradient is exactly 0 even where z == mean and
    # eps == 0 (masking log(d^2 + eps) after the fact would give 0 * inf = NaN there)
    arg = torch.where(mask, d * d + eps, 1.0)
    return torch.log(arg).sum()


def count(mask: torch.Tensor) -> torch.Tensor:
    """Number of True entries as a float64 scalar tensor (exact; no host synchronisation)."""
    return torch.count_nonzero(mask).to(torch.float64)


def reverse_deactivate(z: torch.Tensor, mean: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MEmeL's reverse deactivation (our reading): selected z' = 2 mean - z, in the forward pass.
    Its gradient w.r.t. z is -1 on selected entries, +1 elsewhere."""
    reflected = (2.0 * mean).to(z.dtype) - z
    return torch.where(mask, reflected, z)


# ---------------------------------------------------------------------------------------------
# statistics


def batch_moments(z: torch.Tensor) -> tuple:
    """(count, mean [N], M2 [N]) of a [T, N] batch in fp32, by two passes (mean, then squared deviations)."""
    z = z.detach().float().reshape(-1, z.shape[-1])
    n = z.shape[0]
    mean = z.mean(dim=0)
    m2 = ((z - mean) ** 2).sum(dim=0)
    return torch.full((), float(n), dtype=torch.float32, device=z.device), mean, m2  # a fill: no host copy


def merge_moments(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> tuple:
    """Chan et al. merge of two (count, mean, M2) triples. Counts may be scalars or [N]."""
    na, ma, m2a = a
    nb, mb, m2b = b
    n = na + nb
    safe_n = torch.where(n > 0, n, torch.ones_like(n))
    delta = mb - ma
    mean = ma + delta * (nb / safe_n)
    m2 = m2a + m2b + delta * delta * (na * nb / safe_n)
    return n, mean, m2


def merge_ordered(parts: Iterable[Sequence[torch.Tensor]]) -> tuple:
    """Left fold of merge_moments over ``parts`` in the given order (deterministic)."""
    parts = list(parts)
    acc = tuple(parts[0])
    for p in parts[1:]:
        acc = merge_moments(acc, p)
    return acc


def decay_moments(stats: Sequence[torch.Tensor], decay: float) -> tuple:
    """Exponential forgetting: scale count and M2 by ``decay`` (mean unchanged)."""
    n, mean, m2 = stats
    return n * decay, mean, m2 * decay


def quantile_tau(phi_values: torch.Tensor, ratio: float) -> float:
    """The exact (1 - ratio) quantile of phi (used once, to initialise the moving threshold)."""
    flat = phi_values.detach().float().flatten()
    k = max(1, int(round(ratio * flat.numel())))
    return float(torch.topk(flat, k).values[-1])
