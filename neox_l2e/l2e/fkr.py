"""False Killing Rate (FKR) and the monosemanticity-score validation quantities (method §5, §6).

All functions take one layer's activations ``z`` [T, N] (T labelled token positions, N neurons) and integer
token labels ``labels`` [T] (feature ids 0..L-1; a negative label means "unlabelled": the token counts in
the neurons' mean and variance but in no per-label quantity and in no kill).

Pipeline (what a scan tool does per layer)::

    phi   = dataset_phi(z)                                  # mean / var over all of the neuron's outputs
    pl, pnl = label_phi_means(phi, labels, L)               # phi_l [L, N], phi_-l [L, N]
    lstar = preferred_labels(pl)                            # l*_j [N]
    res   = fkr(phi, labels, lstar, k_percents=[1, 2, 3])   # {k: FKRResult}; mode="per-token" (default)
                                                            #  or "global"

For data that do not fit in memory, ``moments`` / ``dataset_phi(z, mean, var)`` take statistics
accumulated over chunks (e.g. with ``functional.batch_moments`` + ``functional.merge_moments``),
``label_phi_sums`` returns additive per-chunk sums, and ``kill_counts`` returns additive per-chunk
(kills, false kills) for a fixed global threshold or the per-token reading. ``GlobalKills`` gives the
global reading's exact tau_k and kill counts over chunks in two streamed passes, in linear time and
constant memory (a radix histogram of the fp32 bit patterns, no running top-K).

Definitions:
    phi_ij   = (z_ij - mean_j)^2 / var_j   (unbiased var over the dataset; 0 for a constant neuron)
    phi_l[l, j]  = mean of phi_ij over tokens i with label l;  phi_-l[l, j] = over labelled tokens with label != l
    l*_j     = argmax_l phi_l[l, j]         (labels absent from the data are never chosen)
    kill     = (i, j) with phi_ij >= tau_k;  false kill: label_i != l*_j;  FKR = false kills / kills
    tau_k    "per-token": the K-th largest phi among token i's N neurons, K = max(1, round(k/100 * N))
             "global":    the K-th largest phi over all (token, neuron) pairs, K = max(1, round(k/100 * N * T))
             (T = labelled tokens; k is a percentage of neurons in both readings)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Sequence, Tuple

import torch

MODES = ("per-token", "global")


@dataclass(frozen=True)
class FKRResult:
    k_percent: float
    mode: str
    kills: int
    false_kills: int

    @property
    def fkr(self) -> float:
        """false kills / kills (NaN when nothing was killed)."""
        return self.false_kills / self.kills if self.kills else float("nan")


def _check(z: torch.Tensor, labels: Optional[torch.Tensor] = None) -> None:
    if z.dim() != 2:
        raise ValueError(f"z must be [T, N], got {tuple(z.shape)}")
    if labels is not None and (labels.dim() != 1 or labels.shape[0] != z.shape[0]):
        raise ValueError(f"labels must be [T] with T = {z.shape[0]}, got {tuple(labels.shape)}")


def moments(z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-neuron mean and unbiased variance of z [T, N] over all T rows (float64, two passes)."""
    _check(z)
    z = z.detach().to(torch.float64)
    mean = z.mean(dim=0)
    var = ((z - mean) ** 2).sum(dim=0) / max(z.shape[0] - 1, 1)
    return mean, var


def dataset_phi(
    z: torch.Tensor, mean: Optional[torch.Tensor] = None, var: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """phi [T, N] (float32) with the neuron's mean / var over the dataset (computed from z when not given).
    Constant neurons (var == 0) score 0 everywhere."""
    _check(z)
    if mean is None or var is None:
        mean, var = moments(z)
    mean = mean.to(torch.float64, copy=False).to(z.device)
    var = var.to(torch.float64, copy=False).to(z.device)
    inv = torch.where(var > 0, 1.0 / torch.where(var > 0, var, torch.ones_like(var)), torch.zeros_like(var))
    d = z.detach().to(torch.float64) - mean
    return (d * d * inv).to(torch.float32)


def label_phi_sums(phi: torch.Tensor, labels: torch.Tensor, num_labels: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Additive per-label sums: (sum of phi over tokens of label l [L, N] float64, token count per label [L])."""
    _check(phi, labels)
    labels = labels.to(phi.device).long()
    keep = labels >= 0
    if num_labels <= 0:
        raise ValueError("num_labels must be positive")
    if keep.any() and int(labels[keep].max()) >= num_labels:
        raise ValueError(f"a label is >= num_labels ({num_labels})")
    sums = torch.zeros(num_labels, phi.shape[1], dtype=torch.float64, device=phi.device)
    sums.index_add_(0, labels[keep], phi[keep].to(torch.float64))
    counts = torch.bincount(labels[keep], minlength=num_labels).to(torch.float64)
    return sums, counts


def label_phi_means(
    phi: torch.Tensor, labels: torch.Tensor, num_labels: int, sums: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(phi_l [L, N], phi_-l [L, N]) in float64 (method §6). NaN where a label (or its complement) has no token.
    ``sums`` = accumulated ``label_phi_sums`` output (then ``phi``/``labels`` are not read)."""
    s, c = sums if sums is not None else label_phi_sums(phi, labels, num_labels)
    c = c.unsqueeze(1)
    tot_s, tot_c = s.sum(dim=0, keepdim=True), c.sum()
    nan = torch.full_like(s, float("nan"))
    phi_l = torch.where(c > 0, s / c.clamp_min(1.0), nan)
    rest_c = tot_c - c
    phi_not_l = torch.where(rest_c > 0, (tot_s - s) / rest_c.clamp_min(1.0), nan)
    return phi_l, phi_not_l


def preferred_labels(phi_l: torch.Tensor) -> torch.Tensor:
    """l*_j [N] (int64): the label with the highest mean phi for neuron j (absent labels, NaN, never win;
    ties go to the smallest label)."""
    scores = torch.nan_to_num(phi_l, nan=float("-inf"))
    return scores.argmax(dim=0)


def kills_for(k_percent: float, n: int) -> int:
    """K = max(1, round(k% * n)): the rank of tau_k among n values (n = N per token, or N * T globally)."""
    return max(1, int(round(float(k_percent) / 100.0 * n)))


_num = kills_for  # older private name, kept for callers


def kill_threshold(phi: torch.Tensor, k_percent: float, mode: str = "per-token") -> torch.Tensor:
    """tau_k: [T, 1] per token ("per-token") or a 0-dim scalar ("global"); see the module docstring."""
    _check(phi)
    if mode == "per-token":
        K = min(_num(k_percent, phi.shape[1]), phi.shape[1])
        return torch.topk(phi, K, dim=1).values[:, K - 1 : K]
    if mode == "global":
        flat = phi.reshape(-1)
        K = min(_num(k_percent, flat.numel()), flat.numel())
        return torch.topk(flat, K).values[K - 1]
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


_HI_BITS = 16  # phi >= 0: its fp32 bit pattern (sign bit 0) is a 31-bit int ordered like the value
_LO_BITS = 15


class GlobalKills:
    """The "global" reading streamed over chunks of one layer's phi [T_chunk, N] (phi >= 0), for several k.

    Pass A (``add_values``, every chunk): a histogram of the top 16 bits of phi's fp32 bit patterns, which for
    phi >= 0 order like the values. ``finish_values()``: per k, the bin holding the K-th largest value and the
    count of values above that bin. Pass B (``add_kills``, every chunk again, with l* known): kills and false
    kills above the bin, and histograms of the low 15 bits of the values inside the bin (all and false kills).
    ``result()``: per k, the exact tau_k (the K-th largest value, K = kills_for(k, N * T)) and the exact kill
    and false-kill counts of phi >= tau_k: the same numbers as ``kill_threshold(phi, k, "global")`` and
    ``kill_counts`` on all chunks at once. Each pass is linear in the values; memory is a few histograms.
    Tokens with a negative label count in tau_k but kill nothing (as ``kill_counts``)."""

    def __init__(self, k_percents: Iterable[float], total_values: int, device=None):
        self.ks = [float(k) for k in k_percents]
        self.total = int(total_values)
        self.K = {k: min(kills_for(k, self.total), self.total) for k in self.ks}
        self.hist = torch.zeros(1 << _HI_BITS, dtype=torch.int64, device=device)
        self.seen = 0
        self.bins: Dict[float, Tuple[int, int]] = {}

    @staticmethod
    def _bits(phi: torch.Tensor) -> torch.Tensor:
        v = torch.nan_to_num(phi.detach().float(), nan=0.0).clamp_min(0.0).contiguous()
        return v.view(torch.int32).reshape(-1)

    def add_values(self, phi: torch.Tensor) -> None:
        bits = self._bits(phi)
        self.hist += torch.bincount(bits >> _LO_BITS, minlength=1 << _HI_BITS)
        self.seen += bits.numel()

    def finish_values(self) -> None:
        if self.seen != self.total:
            raise ValueError(f"GlobalKills: saw {self.seen} values, expected {self.total}")
        above = _from_top(self.hist).cpu()  # above[b] = count of values in bins >= b
        for k in self.ks:
            b = int((above >= self.K[k]).nonzero().max())  # the highest bin with >= K values from it up
            self.bins[k] = (b, int(above[b] - self.hist[b]))
        dev, n = self.hist.device, 1 << _LO_BITS
        # per k, histograms of the low bits inside the bin: every value, the kills (labelled), the false kills
        self.low = {k: [torch.zeros(n, dtype=torch.int64, device=dev) for _ in range(3)] for k in self.ks}
        self.above = {k: [0, 0] for k in self.ks}  # kills, false kills above the bin

    def add_kills(self, phi: torch.Tensor, labels: torch.Tensor, lstar: torch.Tensor) -> None:
        _check(phi, labels)
        labels = labels.to(phi.device).long()
        bits = self._bits(phi).view(phi.shape)
        hi = bits >> _LO_BITS
        keep = (labels >= 0).unsqueeze(1)
        false = keep & (labels.unsqueeze(1) != lstar.to(phi.device).unsqueeze(0))
        mask, n = (1 << _LO_BITS) - 1, 1 << _LO_BITS
        for k in self.ks:
            b = self.bins[k][0]
            over = hi > b
            self.above[k][0] += int((over & keep).sum())
            self.above[k][1] += int((over & false).sum())
            inside = hi == b
            for hist, sel in zip(self.low[k], (inside, inside & keep, inside & false)):
                hist += torch.bincount(bits[sel] & mask, minlength=n)

    def result(self) -> Dict[float, Tuple[float, int, int]]:
        """{k: (tau_k, kills, false kills)}."""
        out = {}
        for k in self.ks:
            b, n_above = self.bins[k]
            every, kill, false = (_from_top(h).cpu() for h in self.low[k])
            j = int((every >= self.K[k] - n_above).nonzero().max())  # the K-th largest value's low bits
            tau = torch.tensor((b << _LO_BITS) | j, dtype=torch.int32).view(torch.float32).item()
            out[k] = (tau, self.above[k][0] + int(kill[j]), self.above[k][1] + int(false[j]))
        return out


def _from_top(hist: torch.Tensor) -> torch.Tensor:
    """out[i] = hist[i:].sum()."""
    return hist.flip(0).cumsum(0).flip(0)


def kill_counts(phi: torch.Tensor, labels: torch.Tensor, lstar: torch.Tensor, tau: torch.Tensor) -> Tuple[int, int]:
    """(kills, false kills) of phi >= tau among labelled tokens; tau is [T, 1] or a scalar. Additive over chunks."""
    _check(phi, labels)
    labels = labels.to(phi.device).long()
    keep = labels >= 0
    kill = (phi >= tau) & keep.unsqueeze(1)
    false = kill & (labels.unsqueeze(1) != lstar.to(phi.device).unsqueeze(0))
    return int(kill.sum()), int(false.sum())


def neuron_kill_counts(
    phi: torch.Tensor, labels: torch.Tensor, lstar: torch.Tensor, tau: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per neuron: (kills [N], false kills [N]) (int64) of phi >= tau among labelled tokens. A neuron's own
    FKR is false / kills. Additive over chunks."""
    _check(phi, labels)
    labels = labels.to(phi.device).long()
    kill = (phi >= tau) & (labels >= 0).unsqueeze(1)
    false = kill & (labels.unsqueeze(1) != lstar.to(phi.device).unsqueeze(0))
    return kill.sum(dim=0), false.sum(dim=0)


def fkr(
    phi: torch.Tensor, labels: torch.Tensor, lstar: torch.Tensor, k_percents: Iterable[float], mode: str = "per-token"
) -> Dict[float, FKRResult]:
    """FKR for each k (percent of neurons). Unlabelled tokens (label < 0) are dropped first."""
    _check(phi, labels)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    keep = labels.to(phi.device) >= 0
    phi, labels = phi[keep], labels.to(phi.device)[keep]
    out = {}
    for k in k_percents:
        if phi.shape[0] == 0:
            out[k] = FKRResult(float(k), mode, 0, 0)
            continue
        kills, false = kill_counts(phi, labels, lstar, kill_threshold(phi, k, mode))
        out[k] = FKRResult(float(k), mode, kills, false)
    return out


def fkr_from_activations(
    z: torch.Tensor, labels: torch.Tensor, num_labels: int, k_percents: Iterable[float], mode: str = "per-token"
) -> Tuple[Dict[float, FKRResult], torch.Tensor]:
    """The whole pipeline on one layer: returns ({k: FKRResult}, l* [N])."""
    phi = dataset_phi(z)
    phi_l, _ = label_phi_means(phi, labels, num_labels)
    lstar = preferred_labels(phi_l)
    return fkr(phi, labels, lstar, k_percents, mode), lstar


def ks_statistic(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic sup_x |F_a(x) - F_b(x)| of 1-D samples (exact, with ties)."""
    a = a.detach().to(torch.float64).reshape(-1).sort().values
    b = b.detach().to(torch.float64).reshape(-1).sort().values
    if a.numel() == 0 or b.numel() == 0:
        return float("nan")
    x = torch.cat([a, b])
    fa = torch.searchsorted(a, x, right=True).to(torch.float64) / a.numel()
    fb = torch.searchsorted(b, x, right=True).to(torch.float64) / b.numel()
    return float((fa - fb).abs().max())


def neuron_ks(phi: torch.Tensor, labels: torch.Tensor, neuron: int, label: int) -> float:
    """§6: K-S statistic between neuron j's phi on tokens of ``label`` and its phi on all (labelled) tokens."""
    _check(phi, labels)
    labels = labels.to(phi.device)
    col = phi[labels >= 0, neuron]
    own = phi[labels == label, neuron]
    return ks_statistic(own, col)


def sample_neurons(num_neurons: int, n: int, seed: int = 0) -> torch.Tensor:
    """min(n, N) distinct neuron indices drawn with a fixed seed (the paper samples 1,000 per layer)."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(num_neurons, generator=g)[: min(n, num_neurons)].sort().values


def mean_phi_lstar(
    phi_l: torch.Tensor, lstar: Optional[torch.Tensor] = None, neurons: Optional[Sequence[int]] = None
) -> float:
    """§6 layer summary: mean over ``neurons`` (default all) of phi_{l*_j}[j]."""
    if lstar is None:
        lstar = preferred_labels(phi_l)
    idx = (
        torch.arange(phi_l.shape[1], device=phi_l.device)
        if neurons is None
        else torch.as_tensor(neurons, device=phi_l.device).long()
    )
    vals = phi_l[lstar[idx], idx]
    return float(vals.mean())
