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
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np
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


#: elements of z per block of rows in ``scan`` (512 KiB of fp32: the block's temporaries stay in cache)
SCAN_BLOCK = 131072
#: sample size for the bound of MEmeL's k-th largest phi (``scan`` with top_k)
TOP_K_SAMPLE = 65536
_F32_MAX = float(torch.finfo(torch.float32).max)
#: ``scan`` on CPU sweeps in C++ (kernels/csrc/l2e_scan.cpp) when the helper is built; False: the torch blocks
USE_CPP_SCAN = True
#: threads of the C++ sweep. One: threads of its own compete with torch's OpenMP workers, which keep spinning after
#: each parallel op (measured on 2 cores, torch at 2 threads, one test training two short L2E runs: 98 s with 2
#: sweep threads, 74 s and 84 s with 1, 82 s with the torch sweep: single runs, about 10 % noise)
SCAN_CPP_THREADS = 1

try:
    from neox_l2e.kernels import _l2e_scan as _cpp_scan
except ImportError:  # not built (no compiler or pybind11): the torch sweep, same results up to summation order
    _cpp_scan = None


@dataclass
class Scan:
    """What ``scan`` computes on a [T, N] batch (0-dim / flat tensors unless noted).

    moments: (count, mean [N], M2 [N]) or None; phi: the full [T, N] phi or None (only with keep_phi);
    phi_sum: sum of phi (fp32); sel, sel_phi, sel_d: the selection as flat indices, its phi and its z - mean (None
    for MEmeL's fallback); cand_phi: every phi >= ``bound`` (a superset of the selection; None when the top-k fell
    back to a full top-k); bound: a float <= the selection's phi and <= level_bound."""

    moments: Optional[tuple] = None
    phi: Optional[torch.Tensor] = None
    phi_sum: Optional[torch.Tensor] = None
    sel: Optional[torch.Tensor] = None
    sel_phi: Optional[torch.Tensor] = None
    sel_d: Optional[torch.Tensor] = None
    cand_phi: Optional[torch.Tensor] = None
    bound: object = None


def scan(
    z: torch.Tensor,
    mean: torch.Tensor,
    inv_var: torch.Tensor,
    *,
    tau: Optional[float] = None,
    top_k: Optional[int] = None,
    level_bound: Optional[float] = None,
    moments: bool = True,
    keep_phi: bool = False,
) -> Scan:
    """The statistics, phi and the selection of one fp32 batch z [T, N] in one sweep over blocks of rows (each
    block's temporaries stay in cache), without a dense mask, a sort or a top-k over all T x N entries.

    Per block: d = z - mean (the running mean), d^2 and phi = d^2 * inv_var (the bits of ``phi``), the column sums
    of d and d^2, and the positions where phi >= bound, with their d and phi taken from the block.

    moments: shifted by the running mean: batch mean = mean + S1 / T, M2 = S2 - S1^2 / T (S1, S2 the column sums
    of d and d^2), from the d and d^2 that phi needs anyway (no pass of its own). Its rounding error relative to
    M2 is about eps32 x (1 + T (batch mean - mean)^2 / M2): a few eps32 once the running mean tracks the batch
    mean, larger only when they are many standard deviations apart (the first batch of a neuron whose mean is far
    from 0, folded in with the count of one batch). phi_sum = sum over columns of S2 x inv_var (sum of phi up to
    rounding).

    - ``tau`` (L2E): selected = phi >= tau; bound = min(tau, level_bound).
    - ``top_k`` (MEmeL): exactly the k largest phi (ties by topk's order among the candidates). The bound is a
      little below the k-th largest phi, from a strided sample of about TOP_K_SAMPLE entries (the sample's r-th
      largest, r = its expected share of k plus 4 standard deviations), capped by level_bound; torch.topk runs
      over the candidates only. The k largest of all lie among any set of at least k entries at or above a bound,
      so this is exact; when fewer than k candidates come out (a bound too high: improbable), the full torch.topk
      over all of phi is used instead.

    Selections are in row-major (ascending) order for tau; the metrics count phi > level on ``cand_phi`` for
    levels >= bound (all of them when level_bound = min(levels))."""
    z = z.detach().float().reshape(-1, z.shape[-1])
    T, N = z.shape
    out = Scan()
    bound = None
    if tau is not None:
        bound = float(tau) if level_bound is None else min(float(tau), float(level_bound))
    elif top_k is not None:
        k = max(0, min(int(top_k), T * N))
        bound = float(_top_k_bound(z, mean, inv_var, k, level_bound)) if k else math.inf
    sweep = _sweep_cpp if _cpp_scan_usable(z, mean, inv_var) and not keep_phi else _sweep_blocks
    s1, s2, idx, cand_d, vals, full = sweep(z, mean, inv_var, bound, keep_phi)
    if moments:
        out.moments = _shifted_moments(z, mean, s1, s2)
    out.phi, out.phi_sum, out.bound = full, (s2 * inv_var.double()).sum().to(torch.float32), bound
    if bound is None:
        return out
    if tau is not None:
        if bound < tau:
            keep = _flat_at_least(vals, float(tau))
            out.sel, out.sel_d, out.sel_phi = idx[keep], cand_d[keep], vals[keep]
        else:
            out.sel, out.sel_d, out.sel_phi = idx, cand_d, vals
        out.cand_phi = vals
    elif idx.numel() >= k:  # a shape, not a host copy of a value
        top = torch.topk(vals, k, sorted=False)
        out.sel, out.sel_phi, out.cand_phi = idx.index_select(0, top.indices), top.values, vals
        out.sel_d = cand_d.index_select(0, top.indices)
    else:  # the fallback: the full top-k (phi kept for the metrics' level counts)
        out.phi = full if keep_phi else phi(z, mean, inv_var)
        top = torch.topk(out.phi.reshape(-1), k, sorted=False)
        out.sel, out.sel_phi, out.bound = top.indices, top.values, None
    return out


#: ``scan``'s moments are redone in two passes when a column's batch mean lies more than this many batch standard
#: deviations from the running mean (the shift), where the shifted formula would lose digits of M2
SHIFT_LIMIT_STD = 8.0


def _shifted_moments(z, mean, s1, s2) -> tuple:
    """(count, mean, M2) of z [T, N] from the fp64 column sums S1 of z - mean and S2 of (z - mean)^2 (fp32 in and
    out): batch mean = mean + S1 / T, M2 = S2 - S1^2 / T. Each d^2 carries a rounding of about eps32 x d^2 (and the
    C++ sweep's fp32 chunk sums of 32 rows a few more), so the error relative to M2 is about
    eps32 x (1 + T x shift^2 / M2) (shift = batch mean - mean) times a small factor: at most a few hundred eps32
    within SHIFT_LIMIT_STD standard deviations (measured at 7.9, T = 8192: 19 eps32 in C++, 1 in the torch sweep).
    The columns beyond that (the first batch of a neuron far from the initial mean 0, or a jump; usually none) get
    ``batch_moments``' two passes over their own z; which columns is decided on the device (an index list, as the
    gather form's selection), without a host copy."""
    T = z.shape[0]
    shift = s1 / T
    m2 = (s2 - s1 * shift).clamp_min_(0.0)
    f32 = dict(dtype=torch.float32, device=z.device)
    bmean, bm2 = (mean.double() + shift).to(torch.float32), m2.to(torch.float32)
    far = torch.nonzero(shift * shift * T > SHIFT_LIMIT_STD**2 * m2).squeeze(1)
    if far.numel():  # a shape, not a host copy of a value
        _, far_mean, far_m2 = batch_moments(z.index_select(1, far))
        bmean.index_copy_(0, far, far_mean)
        bm2.index_copy_(0, far, far_m2)
    return torch.full((), float(T), **f32), bmean, bm2


def _sweep_blocks(z, mean, inv_var, bound: Optional[float], keep_phi: bool):
    """The sweep of ``scan`` in torch, over blocks of rows that stay in cache (the reference of the C++ sweep):
    (S1, S2 fp64 [N], candidate positions int64, their d and phi fp32, the full phi or None)."""
    T, N = z.shape
    rows = max(1, SCAN_BLOCK // max(N, 1))
    s1 = torch.zeros(N, dtype=torch.float64, device=z.device)
    s2 = torch.zeros(N, dtype=torch.float64, device=z.device)
    full = torch.empty_like(z) if keep_phi else None
    d_buf, d2_buf, p_buf = (torch.empty(min(rows, T), N, dtype=torch.float32, device=z.device) for _ in range(3))
    parts = []  # per block: (flat positions, their d, their phi)
    for i in range(0, T, rows):
        zb = z[i : i + rows]
        n = zb.shape[0]
        d = torch.sub(zb, mean, out=d_buf[:n])
        s1 += d.sum(dim=0, dtype=torch.float64)
        d2 = torch.mul(d, d, out=d2_buf[:n])
        s2 += d2.sum(dim=0, dtype=torch.float64)
        p = torch.mul(d2, inv_var, out=full[i : i + n] if keep_phi else p_buf[:n])  # the bits of phi()
        if bound is not None:
            pos = _flat_at_least(p, bound)
            parts.append((pos + i * N, d.view(-1).index_select(0, pos), p.view(-1).index_select(0, pos)))
    if bound is None:
        return s1, s2, None, None, None, full
    if not parts:  # no rows
        empty = torch.zeros(0, dtype=torch.float32, device=z.device)
        return s1, s2, torch.zeros(0, dtype=torch.int64, device=z.device), empty, empty.clone(), full
    idx, cand_d, vals = (torch.cat([q[j] for q in parts]) for j in range(3))
    return s1, s2, idx, cand_d, vals, full


def _sweep_cpp(z, mean, inv_var, bound: Optional[float], keep_phi: bool = False):
    """``_sweep_blocks`` in one C++ pass over z (kernels/csrc/l2e_scan.cpp), on SCAN_CPP_THREADS threads (the result
    does not depend on how many)."""
    s1, s2, idx, d, p = _cpp_scan.scan(
        z.numpy(),
        mean.detach().numpy(),
        inv_var.detach().numpy(),
        math.inf if bound is None else float(bound),
        bound is not None,
        SCAN_CPP_THREADS,
    )
    s1, s2 = torch.from_numpy(s1), torch.from_numpy(s2)
    if bound is None:
        return s1, s2, None, None, None, None
    return s1, s2, torch.from_numpy(idx), torch.from_numpy(d), torch.from_numpy(p), None


def _cpp_scan_usable(z: torch.Tensor, mean: torch.Tensor, inv_var: torch.Tensor) -> bool:
    """The C++ sweep takes CPU fp32 tensors only (the torch sweep handles the rest: the same bits need the same
    fp32 operands)."""
    tensors = (z, mean, inv_var)
    return (
        _cpp_scan is not None
        and USE_CPP_SCAN
        and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
    )


def _flat_at_least(p: torch.Tensor, bound: float) -> torch.Tensor:
    """Flat (row-major, ascending) int64 positions of p >= bound. On CPU through numpy (its comparison and
    flatnonzero are several times faster than torch's bool ge and nonzero here)."""
    if p.device.type == "cpu":
        b = np.float32(math.inf if bound > _F32_MAX else bound)  # compared in fp32, as torch does
        return torch.from_numpy(np.flatnonzero(p.numpy() >= b))
    return torch.nonzero(p.reshape(-1) >= bound).squeeze(1)


def _top_k_bound(z, mean, inv_var, k: int, level_bound: Optional[float]) -> torch.Tensor:
    """A value a little below the k-th largest phi of z, from phi on a strided sample of z's entries."""
    flat = z.reshape(-1)
    n = flat.numel()
    stride = max(1, n // TOP_K_SAMPLE)
    stride += 1 - stride % 2 if stride > 1 else 0  # odd: not a divisor of a power-of-two row length
    pos = torch.arange(0, n, stride, device=z.device)
    col = pos.remainder(z.shape[-1])
    sample = phi(flat.index_select(0, pos), mean.index_select(0, col), inv_var.index_select(0, col))
    m = sample.numel()
    expect = k * m / n
    r = min(m, int(math.ceil(expect + 4.0 * math.sqrt(expect) + 8.0)))
    b = torch.topk(sample, r, sorted=False).values.min()
    return b.clamp(max=float(level_bound)) if level_bound is not None else b


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
