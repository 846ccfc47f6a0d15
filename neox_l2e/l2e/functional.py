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

import math
from typing import Iterable, Optional, Sequence

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


def _at_or_above(flat: torch.Tensor, bound) -> tuple:
    """Flat indices (ascending) of the entries >= bound and their values."""
    idx = torch.nonzero(flat >= bound).squeeze(1)
    return idx, flat.index_select(0, idx)


def select_above(phi: torch.Tensor, tau: float, level_bound: Optional[float] = None) -> tuple:
    """L2E's selection phi >= tau as flat indices (ascending, i.e. row-major order), without a dense mask:
    ``(sel, sel_phi, cand_phi, bound)``. One comparison pass finds every phi >= bound = min(tau, level_bound)
    (``cand_phi``, their values: what the metrics count phi > level on, for levels >= bound); the selection is
    taken among them."""
    flat = phi.reshape(-1)
    bound = float(tau) if level_bound is None else min(float(tau), float(level_bound))
    idx, vals = _at_or_above(flat, bound)
    if bound < tau:
        keep = vals >= tau
        return idx[keep], vals[keep], vals, bound
    return idx, vals, vals, bound


#: sample size for the bound of MEmeL's k-th largest phi (select_top_k)
TOP_K_SAMPLE = 65536


def select_top_k(phi: torch.Tensor, k: int, level_bound: Optional[float] = None) -> tuple:
    """MEmeL's selection, exactly the k largest phi (ties by topk's order among the candidates below), as flat
    indices: ``(sel, sel_phi, cand_phi, bound)``, without a sort or top-k over all T x N entries.

    A strided sample of about TOP_K_SAMPLE values gives a bound b a little below the k-th largest phi (the
    sample's r-th largest, r = its expected share of k plus 4 standard deviations); one comparison pass finds the
    candidates phi >= min(b, level_bound) and torch.topk runs over them only. Whenever fewer than k candidates come
    out (a bound too high: improbable), the full torch.topk is used instead, so the selection is always exact: the
    k largest of all lie among any candidate set of at least k entries at or above a bound. ``cand_phi``: the
    candidates' phi (every phi >= ``bound``; None on the fallback, with ``bound`` None)."""
    flat = phi.reshape(-1)
    n = flat.numel()
    k = max(0, min(int(k), n))
    if k == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=phi.device)
        return empty, flat[:0], flat[:0], math.inf
    stride = max(1, n // TOP_K_SAMPLE)
    stride += 1 - stride % 2 if stride > 1 else 0  # odd: not a divisor of a power-of-two row length
    sample = flat[::stride]
    m = sample.numel()
    expect = k * m / n
    r = min(m, int(math.ceil(expect + 4.0 * math.sqrt(expect) + 8.0)))
    b = torch.topk(sample, r, sorted=False).values.min()
    if level_bound is not None:
        b = b.clamp(max=float(level_bound))
    idx, vals = _at_or_above(flat, b)
    if idx.numel() < k:  # a shape, not a host copy of a value
        top = torch.topk(flat, k, sorted=False)
        return top.indices, top.values, None, None
    top = torch.topk(vals, k, sorted=False)
    return idx.index_select(0, top.indices), top.values, vals, b


def top_k_mask(phi: torch.Tensor, k: int) -> torch.Tensor:
    """Dense mask of exactly the k largest phi (torch.topk over all entries; ties by its order)."""
    flat = phi.reshape(-1)
    idx = torch.topk(flat, max(0, min(int(k), flat.numel())), sorted=False).indices
    mask = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
    mask[idx] = True
    return mask.reshape(phi.shape)


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
    d = z - mean
    m2 = d.mul_(d).sum(dim=0)  # the same bits as ((z - mean) ** 2).sum(0), one [T, N] buffer
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
