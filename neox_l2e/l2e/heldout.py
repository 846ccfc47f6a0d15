"""Held-out monosemanticity: the paper's Eq. 1 on a fixed token set, with statistics computed fresh on that set.

What it measures. For every measured MLP layer, a fixed set of K held-out tokens (the first K tokens of the
validation split, in document order: the same tokens for every run and every seed) is run through the model
in eval mode and the post-GELU activations z [K, N] are captured. For each neuron j, the mean and the
unbiased variance are computed over those K tokens, and

    phi_ij = (z_ij - mean_j)^2 / var_j

Per layer this module reports:

    frac_phi_gt_<level>   fraction of the K x N (token, neuron) pairs with phi > level (l2e-reference-levels)
    max_phi_median/_p90   median / 90th percentile over neurons of the neuron's largest phi on the set
    kurtosis_median/_p90  median / 90th percentile over neurons of the Pearson kurtosis m4 / m2^2 (population
                          moments; a Gaussian neuron gives 3, a neuron that fires rarely and strongly much more)
    var_ratio_median      (inhibited layers) median over neurons of held-out variance / the inhibitor's running
                          variance m2 / (count - 1)
    phi histogram         counts of phi in log-spaced bins (``PHI_EDGES``), for the distribution figures

Why. L2E selects with phi against the inhibitor's *running* statistics, and the training metrics
(``l2e_train/...``) are computed against them too. L2E shrinks the scale of the inhibited layers relative to
their own cumulative history, which lowers phi against the running statistics without making the neurons
any less monosemantic: those metrics exaggerate the effect. Statistics computed fresh on a fixed set remove
that shrinkage (phi is scale-free on the set), so the numbers here compare across runs, seeds, layers
(inhibited or not) and the L2E-off baseline. ``var_ratio_median`` shows the shrinkage itself.

How. Two forward passes over the set (no gradients): pass 1 folds per-batch moments (count, mean, M2; Chan's
merge) and per-neuron min / max in float64; pass 2 scores phi against the finished statistics and counts
exceedances, the fourth central moment and the histogram, in float64. Memory is one batch of activations.
Neurons whose held-out variance is <= ``VAR_FLOOR`` have phi = 0 and no kurtosis (left out of its percentiles).

Parallelism. With tensor parallelism each rank owns its 4h/tp neurons: the per-neuron statistics need no
communication; counts are summed and the per-neuron values gathered over the TP group for the percentiles,
so every rank gets the layer-wide numbers. Every data-parallel rank measures the same set (identical results).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

VAR_FLOOR = 1e-12
DEFAULT_TOKENS = 16384
#: log10-spaced phi bin edges (10 per decade, 1e-4 .. 1e5); below the first and above the last are the
#: underflow (phi = 0 included) and overflow bins: histograms have len(PHI_EDGES) + 1 counts
PHI_EDGES = [10.0 ** (e / 10.0) for e in range(-40, 51)]
PREFIX = "ms_heldout"


class HeldoutError(ValueError):
    """A held-out measurement setting that cannot be met (raised as the caller's ConfigError)."""


# ------------------------------------------------------------------------------------------------
# the token set and the layers


def _dataset_documents(ds) -> Optional[Iterator[np.ndarray]]:
    """The documents of an indexed dataset (GPTDataset, or a BlendedDataset of them) in file order, or None."""
    if hasattr(ds, "indexed") and hasattr(ds, "doc_range"):
        start, end = ds.doc_range

        def docs():
            for d in range(start, end):
                yield np.asarray(ds.indexed[d], dtype=np.int64)

        return docs()
    if hasattr(ds, "datasets") and all(hasattr(d, "indexed") and hasattr(d, "doc_range") for d in ds.datasets):
        parts = [_dataset_documents(d) for d in ds.datasets]

        def chained():
            for p in parts:
                yield from p

        return chained()
    return None


def heldout_tokens(
    dataset, n_tokens: Optional[int], key: str = "ms-heldout-tokens", split: str = "valid"
) -> torch.Tensor:
    """The first ``n_tokens`` tokens of ``dataset`` in a fixed order, as a 1-D int64 tensor.

    An indexed dataset (GPTDataset / BlendedDataset) is read document by document in file order, which does
    not depend on the run's seed (its samples are shuffled with the seed); any other dataset of
    {"text": [seq+1]} samples is read sample 0, 1, ... (its first seq tokens each).
    ``n_tokens`` None: up to DEFAULT_TOKENS (fewer if the split is smaller); a number: exactly that many, and
    a HeldoutError naming ``key`` when the split holds fewer.
    """
    want = DEFAULT_TOKENS if n_tokens is None else int(n_tokens)
    if want <= 0:
        raise HeldoutError(f"{key}: {want} tokens requested; use a positive number (or 0 to turn the measurement off)")
    got: List[np.ndarray] = []
    have = 0
    docs = _dataset_documents(dataset)
    if docs is None:

        def samples():
            for i in range(len(dataset)):
                yield np.asarray(dataset[i]["text"], dtype=np.int64)[:-1]

        docs = samples()
    for d in docs:
        if have >= want:
            break
        got.append(d[: want - have])
        have += len(got[-1])
    if have < want and n_tokens is not None:
        raise HeldoutError(
            f"{key}: {want} held-out tokens requested but the {split} split holds only {have}; "
            f"lower {key} or give a larger {split} set"
        )
    if have == 0:
        raise HeldoutError(f"{key}: the {split} split holds no tokens")
    return torch.from_numpy(np.concatenate(got)).long()


def resolve_layers(spec, num_layers: int, inhibited: Sequence[int], key: str = "ms-heldout-layers") -> List[int]:
    """'all' -> every layer; 'inhibited' -> the layers l2e-layers names (whether or not L2E is on, so a
    baseline measures the layers its L2E counterpart inhibits); a list -> those 0-based layers."""
    if isinstance(spec, str):
        s = spec.strip().lower()
        if s == "all":
            return list(range(num_layers))
        if s == "inhibited":
            layers = sorted(set(int(i) for i in inhibited))
            if not layers:
                raise HeldoutError(f"{key}: 'inhibited' names no layer (l2e-layers resolves to none)")
            return layers
        raise HeldoutError(f"{key}: unknown value {spec!r}; use all, inhibited or a list of layer indices")
    if isinstance(spec, (list, tuple)):
        try:
            layers = sorted({int(i) for i in spec})
        except (TypeError, ValueError):
            raise HeldoutError(f"{key}: {spec!r} is not a list of layer indices") from None
        if not layers:
            raise HeldoutError(f"{key}: the list names no layer; give layer indices, 'all' or 'inhibited'")
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad:
            raise HeldoutError(f"{key}: layer {bad[0]} is out of range for num-layers {num_layers}")
        return layers
    raise HeldoutError(f"{key}: {spec!r}: use all, inhibited or a list of layer indices")


def batches(tokens: torch.Tensor, seq_length: int, batch_size: int) -> Iterator[torch.Tensor]:
    """[b, seq_length] rows of the token set in order; a last partial row comes alone as [1, rest]."""
    full = tokens.numel() // seq_length
    rows = tokens[: full * seq_length].reshape(full, seq_length)
    for s in range(0, full, batch_size):
        yield rows[s : s + batch_size]
    if tokens.numel() > full * seq_length:
        yield tokens[full * seq_length :].reshape(1, -1)


# ------------------------------------------------------------------------------------------------
# the per-layer two-pass accumulator


class LayerAccumulator:
    """Per-neuron statistics of one layer's activations on the held-out set (this TP rank's neurons)."""

    chunk_rows = 4096

    def __init__(self, levels: Sequence[float]):
        self.levels = [float(v) for v in levels]
        self.count = 0
        self.mean = self.m2 = self.zmin = self.zmax = None
        self.var = self.inv_var = None
        self.exceed = self.m4 = self.hist = None
        self.edges = None

    def _chunks(self, z: torch.Tensor) -> Iterator[torch.Tensor]:
        z = z.detach().reshape(-1, z.shape[-1])
        for s in range(0, z.shape[0], self.chunk_rows):
            yield z[s : s + self.chunk_rows].to(torch.float64)

    def add_pass1(self, z: torch.Tensor) -> None:
        """Fold a batch into (count, mean, M2, min, max) with Chan's merge."""
        for c in self._chunks(z):
            nb = c.shape[0]
            if nb == 0:
                continue
            bm = c.mean(0)
            bm2 = (c - bm).pow(2).sum(0)
            if self.mean is None:
                self.count, self.mean, self.m2 = nb, bm, bm2
                self.zmin, self.zmax = c.min(0).values, c.max(0).values
                continue
            na = self.count
            n = na + nb
            delta = bm - self.mean
            self.mean = self.mean + delta * (nb / n)
            self.m2 = self.m2 + bm2 + delta.pow(2) * (na * nb / n)
            self.count = n
            self.zmin = torch.minimum(self.zmin, c.min(0).values)
            self.zmax = torch.maximum(self.zmax, c.max(0).values)

    def finish_pass1(self) -> None:
        if self.mean is None or self.count < 2:
            raise HeldoutError("ms-heldout-tokens: at least 2 held-out tokens are needed for a variance")
        self.var = self.m2 / (self.count - 1)
        ok = self.var > VAR_FLOOR
        self.inv_var = torch.where(ok, 1.0 / self.var.clamp_min(VAR_FLOOR), torch.zeros_like(self.var))
        dev = self.mean.device
        self.exceed = torch.zeros(len(self.levels), dtype=torch.float64, device=dev)
        self.m4 = torch.zeros_like(self.mean)
        self.edges = torch.tensor(PHI_EDGES, dtype=torch.float64, device=dev)
        self.hist = torch.zeros(len(PHI_EDGES) + 1, dtype=torch.float64, device=dev)

    def add_pass2(self, z: torch.Tensor) -> None:
        """Score phi against the finished statistics: exceedances, fourth moment, histogram."""
        for c in self._chunks(z):
            d = c - self.mean
            d2 = d * d
            self.m4 += (d2 * d2).sum(0)
            phi = d2 * self.inv_var
            for i, lv in enumerate(self.levels):
                self.exceed[i] += (phi > lv).sum()
            idx = torch.bucketize(phi.reshape(-1), self.edges, right=True)
            self.hist += torch.bincount(idx, minlength=self.hist.numel()).to(torch.float64)

    def per_neuron(self) -> Dict[str, torch.Tensor]:
        """max phi, kurtosis (NaN for degenerate neurons) and the variance, per neuron of this rank."""
        dev_max = torch.maximum(self.zmax - self.mean, self.mean - self.zmin)
        max_phi = dev_max.pow(2) * self.inv_var
        m2p = self.m2 / self.count  # population moments for the kurtosis
        kurt = torch.where(
            self.var > VAR_FLOOR, (self.m4 / self.count) / m2p.clamp_min(1e-300).pow(2), torch.full_like(m2p, math.nan)
        )
        return {"max_phi": max_phi, "kurtosis": kurt, "var": self.var}


# ------------------------------------------------------------------------------------------------
# combining TP ranks and summarising


def _gather_tp(t: torch.Tensor, ps) -> torch.Tensor:
    """Concatenate a per-neuron vector over the TP group (TP-rank order); identity without TP."""
    if ps is None or getattr(ps, "tp", 1) <= 1 or not dist.is_initialized():
        return t
    parts = [torch.empty_like(t) for _ in range(ps.tp)]
    dist.all_gather(parts, t.contiguous(), group=ps.tp_group)
    return torch.cat(parts)


def _sum_tp(t: torch.Tensor, ps) -> torch.Tensor:
    if ps is None or getattr(ps, "tp", 1) <= 1 or not dist.is_initialized():
        return t
    t = t.clone()
    dist.all_reduce(t, group=ps.tp_group)
    return t


def _q(x: torch.Tensor, q: float) -> float:
    x = x[~torch.isnan(x)]
    return float(torch.quantile(x, q)) if x.numel() else math.nan


def summarize(acc: LayerAccumulator, ps=None, running_var: Optional[torch.Tensor] = None) -> dict:
    """The layer's metrics (python floats, layer-wide over TP) and its phi histogram (list of counts).

    ``running_var`` [N of this rank]: the inhibitor's running variance, for ``var_ratio_median``."""
    pn = acc.per_neuron()
    max_phi, kurt = _gather_tp(pn["max_phi"], ps), _gather_tp(pn["kurtosis"], ps)
    sums = _sum_tp(
        torch.cat(
            [acc.exceed, acc.hist, torch.tensor([float(acc.mean.numel())], dtype=torch.float64, device=acc.mean.device)]
        ),
        ps,
    )
    L = len(acc.levels)
    exceed, hist, neurons = sums[:L], sums[L:-1], float(sums[-1])
    pairs = acc.count * neurons
    out = {f"frac_phi_gt_{lv:g}": float(c) / pairs for lv, c in zip(acc.levels, exceed.tolist())}
    out.update(
        {
            "max_phi_median": _q(max_phi, 0.5),
            "max_phi_p90": _q(max_phi, 0.9),
            "kurtosis_median": _q(kurt, 0.5),
            "kurtosis_p90": _q(kurt, 0.9),
        }
    )
    if running_var is not None:
        ratio = pn["var"] / running_var.to(pn["var"]).clamp_min(VAR_FLOOR)
        out["var_ratio_median"] = _q(_gather_tp(ratio, ps), 0.5)
    return {"metrics": out, "hist": [int(round(v)) for v in hist.tolist()], "tokens": acc.count}


def phi_stats(
    chunks: Iterable[torch.Tensor], levels: Sequence[float], running_var: Optional[torch.Tensor] = None
) -> dict:
    """``summarize`` of activations given directly (a re-iterable sequence of [T_i, N] chunks); one process."""
    acc = LayerAccumulator(levels)
    chunks = list(chunks)
    for c in chunks:
        acc.add_pass1(c)
    acc.finish_pass1()
    for c in chunks:
        acc.add_pass2(c)
    return summarize(acc, None, running_var)


# ------------------------------------------------------------------------------------------------
# on a model


@contextlib.contextmanager
def capture_mlp(mlps: Dict[int, torch.nn.Module], handler: Callable[[int, torch.Tensor], None]):
    """Call ``handler(layer, z)`` with each MLP's post-GELU activations [b, s, N] while inside the block.

    The one place here that knows how activations are captured: a forward hook on each MLP's ``up_op`` (the
    module whose output is z), removed on exit."""
    handles = []
    try:
        for i, m in mlps.items():
            handles.append(m.up_op.register_forward_hook(lambda _mod, _args, z, i=i: handler(i, z)))
        yield
    finally:
        for h in handles:
            h.remove()


def running_variance(inhibitor) -> torch.Tensor:
    """The inhibitor's running variance m2 / (count - 1), float64, read from its buffers only."""
    count = inhibitor.count.to(torch.float64)
    return inhibitor.m2.to(torch.float64) / (count - 1.0).clamp_min(1.0)


@torch.no_grad()
def measure(
    forward: Callable[[torch.Tensor], object],
    mlps: Dict[int, torch.nn.Module],
    tokens: torch.Tensor,
    seq_length: int,
    batch_size: int,
    levels: Sequence[float],
    ps=None,
    running_vars: Optional[Dict[int, torch.Tensor]] = None,
    device=None,
) -> Dict[int, dict]:
    """Run the held-out ``tokens`` through ``forward`` twice and summarise every layer of ``mlps``.

    forward: called with a [b, s] int64 batch (the model in eval mode; its output is ignored).
    mlps: {layer index: MLP module (neox_l2e.model.mlp.MLP; its ``up_op`` outputs z)}.
    running_vars: {layer: running variance of this rank's neurons} for the inhibited layers.
    Returns {layer: {"metrics": {...}, "hist": [...], "tokens": K}} (the same on every rank).
    """
    accs = {i: LayerAccumulator(levels) for i in mlps}
    for p in (1, 2):

        def handler(i, z, p=p):
            (accs[i].add_pass1 if p == 1 else accs[i].add_pass2)(z)

        with capture_mlp(mlps, handler):
            for b in batches(tokens, seq_length, batch_size):
                forward(b.to(device) if device is not None else b)
        if p == 1:
            for a in accs.values():
                a.finish_pass1()
    rv = running_vars or {}
    return {i: summarize(a, ps, rv.get(i)) for i, a in accs.items()}


def flat_metrics(results: Dict[int, dict], prefix: str = PREFIX) -> dict:
    """{'<prefix>/layer<i>/<metric>': value} for logging."""
    return {f"{prefix}/layer{i}/{k}": v for i, r in sorted(results.items()) for k, v in r["metrics"].items()}
