"""Running per-neuron statistics and the global (TP x DP) reductions L2E needs, on top of ``functional``.

Statistics are (count, mean, M2) per neuron. A micro-batch contributes its own two-pass moments
(``functional.batch_moments``); data-parallel ranks exchange theirs and fold them with Chan's merge in
DP-rank order, so every replica computes bit-identical running statistics. The merges are done in
float64 (N-sized, cheap) and the result is rounded once to the storage dtypes (count fp64, mean/M2 fp32).

The one-off exact quantile used to initialise the moving threshold is ``global_kth_largest``: a bisection
on the bit patterns of non-negative fp32 values, whose only communication is a one-element all-reduce
per step, so it is exact over any number of ranks without gathering the values.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from . import functional

Moments = tuple  # (count, mean, m2)


def gather_merge_dp(ps, count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor) -> Moments:
    """Merge one (count, mean [N], M2 [N]) per data-parallel rank into the batch moments of the whole
    DP group, in DP-rank order (identical on every rank). Returns float64 (count 0-dim, mean, M2)."""
    n = mean.numel()
    packed = torch.cat(
        [count.reshape(1).to(torch.float64), mean.to(torch.float64).reshape(-1), m2.to(torch.float64).reshape(-1)]
    )
    parts = ps.all_gather_dp(packed)
    return functional.merge_ordered((p[0], p[1 : 1 + n], p[1 + n :]) for p in parts)


def fold(running: Sequence[torch.Tensor], batch: Sequence[torch.Tensor], decay: Optional[float] = None) -> Moments:
    """(Optionally decay, then) fold ``batch`` moments into ``running``: float64 arithmetic, float64 result.
    ``running`` count is [N]; ``batch`` count may be 0-dim."""
    rc, rm, rm2 = (t.to(torch.float64) for t in running)
    if decay is not None:
        rc, rm, rm2 = functional.decay_moments((rc, rm, rm2), float(decay))
    bc, bm, bm2 = (t.to(torch.float64) for t in batch)
    return functional.merge_moments((rc, rm, rm2), (bc.expand_as(rc), bm, bm2))


def two_pass_moments64(z: torch.Tensor) -> Moments:
    """(count, mean, M2) of all rows of z in float64 by two passes: the reference the tests compare to."""
    z = z.detach().to(torch.float64).reshape(-1, z.shape[-1])
    mean = z.mean(dim=0)
    return torch.tensor(float(z.shape[0]), dtype=torch.float64), mean, ((z - mean) ** 2).sum(dim=0)


def kth_index(ratio: float, total: int) -> int:
    """k of the (1 - ratio) quantile among ``total`` values (as ``functional.quantile_tau``)."""
    return max(1, int(round(ratio * total)))


_INF_BITS = 0x7F800000  # bit pattern of +inf in fp32; non-negative floats order like their int32 patterns


def global_kth_largest(
    values: torch.Tensor, k: int, all_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
) -> torch.Tensor:
    """The exact k-th largest of the union of non-negative ``values`` held across ranks (0-dim fp32).

    ``all_reduce`` sums a one-element int64 tensor in place over every rank holding a part of the values
    (None: single process). Bisection over the fp32 bit patterns: 31 steps, each one pass over
    ``values`` and one tiny all-reduce; the search runs on the device (no host synchronisation).
    NaN counts as 0. If the union holds fewer than k values the result is 0.
    """
    v = torch.nan_to_num(values.detach().float().reshape(-1), nan=0.0).clamp_min(0.0)
    bits = v.view(torch.int32)
    dev = v.device
    lo = torch.zeros((), dtype=torch.int64, device=dev)  # count(v >= 0) = all values
    hi = torch.full((), _INF_BITS + 1, dtype=torch.int64, device=dev)  # count(v >= inf + 1ulp) = 0
    for _ in range(32):  # hi - lo <= 2^31 at the start: 32 halvings always reach hi - lo == 1
        mid = (lo + hi) // 2
        cnt = (bits >= mid.to(torch.int32)).sum(dtype=torch.int64).reshape(1)
        if all_reduce is not None:
            all_reduce(cnt)
        ok = cnt[0] >= k
        lo = torch.where(ok, mid, lo)
        hi = torch.where(ok, hi, mid)
    return lo.to(torch.int32).view(torch.float32).clone()
