"""Streaming monosemanticity statistics of MLP neurons on labelled text (the method page, sections 5-6).

For each layer and neuron j (z = the post-GELU MLP hidden unit, one sample per token position):

    pass 1   count, mean_j, var_j over the whole dataset (Chan merge of per-batch (count, mean, M2), float64)
    pass 2   phi_ij = (z_ij - mean_j)^2 / var_j, and, streamed per batch:
               - per-label sums of phi  -> phi_l(j) = mean phi over tokens labelled l
                                           phi_-l(j) = mean phi over the other tokens
               - the phi of a bounded, seeded token subsample for a seeded neuron sample (K-S test)
               - a histogram of the top 16 bits of phi's fp32 patterns ("global" FKR only: fkr.GlobalKills)
    pass 3   (FKR only) kills and false kills per k and tau_k reading, now that l* is known; for the global
             reading also a histogram of the low bits inside the bin that holds tau_k, which gives the exact
             tau_k and the exact counts at the end (linear time, no running top-K)
No activation tensor outlives its batch, so memory does not grow with the dataset.

From the sums: l*_j = argmax_l phi_l(j) (the neuron's relatively monosemantic feature); the K-S statistic of
neuron j compares its phi on tokens of l*_j with its phi on all tokens (scipy.stats.ks_2samp); the FKR at k is
false kills / kills, a false kill being a kill of neuron j on a token whose label is not l*_j. Two readings of
tau_k: "per-token" (default: tau_k is the k-th largest phi among the token's neurons, k a fraction of the
layer's neurons) and "global" (the k-th largest over all (token, neuron) pairs of the layer).
k is a percentage of the layer's neurons in both readings (K = round(k/100 N), or round(k/100 N T) pairs).
Every formula (phi, the per-label sums and means, l*, tau_k, kill counts, the neuron sample) is
neox_l2e.l2e.fkr's; this module only streams them over batches and layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from ..config.schema import L2EConfig
from ..l2e import fkr as fkrlib
from ..l2e import functional as F
from .common import AnalysisError
from .labelled import LabelledTokens

FKR_MODES = ("per-token", "global")
DEFAULT_KS = tuple(L2EConfig().l2e_fkr_k)  # percents: the l2e-fkr-k default (one source of truth)


@dataclass
class ScanOptions:
    batch_size: int = 8  # windows per forward
    layers: Optional[Sequence[int]] = None  # default: all layers
    neuron_sample: int = 1000  # neurons per layer for the mean phi_l* and the K-S test (paper: 1,000)
    ks_tokens: int = 4000  # token subsample kept for the K-S test
    fkr_ks: Sequence[float] = DEFAULT_KS  # k in percent (of the layer's neurons; of N x T pairs for global)
    fkr_modes: Sequence[str] = FKR_MODES
    compute_ks: bool = True
    seed: int = 0
    progress: bool = True

    def validate(self, num_layers: int) -> List[int]:
        layers = list(range(num_layers)) if self.layers is None else sorted({int(i) for i in self.layers})
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad or not layers:
            raise AnalysisError(f"layers {bad or '[]'} out of range for a model with {num_layers} layers")
        for k in self.fkr_ks:
            if not 0.0 < float(k) <= 100.0:
                raise AnalysisError(f"FKR k={k}: must be a percent in (0, 100]")
        for m in self.fkr_modes:
            if m not in FKR_MODES:
                raise AnalysisError(f"FKR mode {m!r}: use one of {', '.join(FKR_MODES)}")
        if self.batch_size < 1 or self.neuron_sample < 1:
            raise AnalysisError("batch size and neuron sample must be positive")
        return layers


@dataclass
class LayerResult:
    layer: int
    num_neurons: int
    phi_l: torch.Tensor  # [C, N] mean phi over tokens with label l
    phi_not_l: torch.Tensor  # [C, N] mean phi over the other tokens
    l_star: torch.Tensor  # [N]
    sample: torch.Tensor  # [M] sampled neuron indices (seeded)
    ks_stat: Optional[torch.Tensor]  # [M] K-S statistic of the sampled neurons (None when off)
    ks_pvalue: Optional[torch.Tensor]
    mean: torch.Tensor  # [N] dataset mean of z
    var: torch.Tensor  # [N] dataset variance of z (unbiased)
    fkr: Dict[str, Dict[float, float]] = field(default_factory=dict)  # mode -> k -> FKR
    kills: Dict[str, Dict[float, int]] = field(default_factory=dict)  # mode -> k -> number of kills
    tau: Dict[float, float] = field(default_factory=dict)  # global tau_k

    @property
    def phi_lstar(self) -> torch.Tensor:
        return self.phi_l.gather(0, self.l_star[None]).squeeze(0)

    @property
    def phi_not_lstar(self) -> torch.Tensor:
        return self.phi_not_l.gather(0, self.l_star[None]).squeeze(0)

    def summary(self, label_names: Sequence[str]) -> dict:
        s = self.sample
        out = {
            "layer": self.layer,
            "num_neurons": self.num_neurons,
            "mean_phi_lstar_sample": float(self.phi_lstar[s].mean()),
            "mean_phi_not_lstar_sample": float(self.phi_not_lstar[s].mean()),
            "mean_phi_lstar_all": float(self.phi_lstar.mean()),
            "mean_phi_not_lstar_all": float(self.phi_not_lstar.mean()),
            "median_ratio_sample": float((self.phi_lstar[s] / self.phi_not_lstar[s].clamp_min(1e-12)).median()),
            "lstar_counts": {label_names[c]: int((self.l_star == c).sum()) for c in range(len(label_names))},
            "dead_neurons": int((self.var <= 0).sum()),
            "fkr": {m: {str(k): v for k, v in d.items()} for m, d in self.fkr.items()},
            "kills": {m: {str(k): v for k, v in d.items()} for m, d in self.kills.items()},
            "tau_global": {str(k): v for k, v in self.tau.items()},
        }
        if self.ks_stat is not None:
            out["mean_ks_stat_sample"] = float(self.ks_stat.mean())
            out["median_ks_stat_sample"] = float(self.ks_stat.median())
        return out


@dataclass
class ScanResult:
    name: str
    num_parameters: int
    num_layers: int
    label_names: List[str]
    tokens_per_label: Dict[str, int]
    layers: List[LayerResult]
    options: dict
    path: str = ""
    inhibited_layers: List[int] = field(default_factory=list)  # L2E's layers in the run (empty: none/unknown)

    def summary(self) -> dict:
        return {
            "name": self.name,
            "path": self.path,
            "num_parameters": self.num_parameters,
            "num_layers": self.num_layers,
            "labels": self.label_names,
            "tokens_per_label": self.tokens_per_label,
            "inhibited_layers": list(self.inhibited_layers),
            "options": self.options,
            "layers": [l.summary(self.label_names) for l in self.layers],
        }

    def chance_fkr(self, layer: "LayerResult") -> float:
        """The FKR of kills that hit random tokens: 1 - the mean over neurons of the share of tokens labelled
        with the neuron's l* (1 - 1/C for balanced labels)."""
        counts = torch.tensor([float(self.tokens_per_label[n]) for n in self.label_names])
        share = counts / counts.sum()
        return float(1.0 - share[layer.l_star].mean())


# ------------------------------------------------------------------------------------------------
# forward with forward hooks on the MLPs' up_op (its output is z)


class _Stop(Exception):
    """Raised from the last needed layer's hook: the rest of the forward (and the logits) is skipped."""


def forward_mlp_activations(
    model,
    data: LabelledTokens,
    layers: Sequence[int],
    batch_size: int,
    handler: Callable,
    desc: str = "",
    progress: bool = False,
) -> None:
    """Run the model over ``data`` in batches; call ``handler(layer, z [T, N], labels [T], token_index [T])``
    for every layer in ``layers`` with the valid (non-padding) tokens of the batch. ``token_index`` numbers
    the dataset's valid tokens 0..num_tokens-1 in window order."""
    blocks = model.gpt_neox.layers
    last = max(layers)
    device = next(model.parameters()).device
    first_index = torch.cumsum(data.valid.sum(1), 0) - data.valid.sum(1)  # index of each window's first token
    state = {}

    def hook_for(i):
        def capture(_module, _args, z):
            z = z.reshape(-1, z.shape[-1])[state["mask"]]
            handler(i, z, state["labels"], state["index"])
            if i == last:
                raise _Stop

        return capture

    handles = []
    try:
        for i in sorted(set(layers)):
            handles.append(blocks[i].mlp.up_op.register_forward_hook(hook_for(i)))
        it = range(0, data.tokens.shape[0], batch_size)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc=desc, unit="batch", leave=False, dynamic_ncols=True)
        with torch.inference_mode():
            for s in it:
                e = min(s + batch_size, data.tokens.shape[0])
                valid = data.valid[s:e]
                seq = valid.shape[1]
                state["mask"] = valid.reshape(-1).to(device)
                state["labels"] = data.labels[s:e, None].expand(-1, seq)[valid].to(device)
                pos = torch.arange(seq)[None].expand(e - s, -1)
                state["index"] = (first_index[s:e, None] + pos)[valid].to(device)
                try:
                    model(data.tokens[s:e].to(device))
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------------------------------
# the passes (the formulas are neox_l2e.l2e.fkr's; this class only streams them over batches)


class _LayerAccumulator:
    def __init__(
        self,
        n: int,
        num_labels: int,
        total_tokens: int,
        opts: ScanOptions,
        device,
        layer: int,
        ks_token_mask: Optional[torch.Tensor],
    ):
        self.n, self.C, self.T = n, num_labels, total_tokens
        self.moments = None
        self.sample = fkrlib.sample_neurons(n, opts.neuron_sample, seed=opts.seed * 1009 + layer)
        self.sample_dev = self.sample.to(device)
        self.ks_token_mask = ks_token_mask
        self.sums = None
        self.ks_phi: List[torch.Tensor] = []
        self.ks_lab: List[torch.Tensor] = []
        self.ks = [float(k) for k in opts.fkr_ks]
        self.modes = [m for m in FKR_MODES if m in opts.fkr_modes]
        # global reading: exact tau_k and kill counts from radix histograms over passes 2 and 3
        self.glob = fkrlib.GlobalKills(self.ks, total_tokens * n, device) if "global" in self.modes else None
        self.tau: Dict[float, float] = {}
        self.counts = {m: {k: [0, 0] for k in self.ks} for m in self.modes}

    # pass 1: mean and variance per neuron (Chan merge of per-batch moments, float64)
    def add_moments(self, z):
        b = tuple(t.double() for t in F.batch_moments(z))
        self.moments = b if self.moments is None else F.merge_moments(self.moments, b)

    def finish_moments(self):
        count, mean, m2 = self.moments
        self.mean = mean
        self.var = m2 / (count - 1.0).clamp_min(1.0)

    # pass 2: per-label sums of phi, K-S subsample, the global reading's histogram
    def add_phi(self, z, labels, index):
        phi = fkrlib.dataset_phi(z, self.mean, self.var)  # [T, N] fp32
        s, c = fkrlib.label_phi_sums(phi, labels, self.C)
        self.sums = (s, c) if self.sums is None else (self.sums[0] + s, self.sums[1] + c)
        if self.ks_token_mask is not None:
            keep = self.ks_token_mask[index]
            if keep.any():
                self.ks_phi.append(phi[keep][:, self.sample_dev].cpu())
                self.ks_lab.append(labels[keep].cpu())
        if self.glob is not None:
            self.glob.add_values(phi)

    def finish_phi(self):
        cnt = self.sums[1]
        if (cnt == 0).any():
            raise AnalysisError("every label needs tokens")
        self.phi_l, self.phi_not_l = fkrlib.label_phi_means(None, None, self.C, sums=self.sums)
        self.lstar = fkrlib.preferred_labels(self.phi_l)
        if self.glob is not None:
            self.glob.finish_values()

    # pass 3: kills and false kills for every k and reading (additive over batches)
    def add_kills(self, z, labels, index):
        phi = fkrlib.dataset_phi(z, self.mean, self.var)
        if "per-token" in self.modes:
            # one sorted top-K for every k: tau_k of each token is its K-th value (kill_threshold's, per k)
            ranks = {k: min(fkrlib.kills_for(k, phi.shape[1]), phi.shape[1]) for k in self.ks}
            top = torch.topk(phi, max(ranks.values()), dim=1).values
            for k in self.ks:
                tau = top[:, ranks[k] - 1 : ranks[k]]
                kills, false = fkrlib.kill_counts(phi, labels, self.lstar, tau)
                acc = self.counts["per-token"][k]
                acc[0] += kills
                acc[1] += false
        if self.glob is not None:
            self.glob.add_kills(phi, labels, self.lstar)

    def finish_kills(self):
        if self.glob is not None:
            for k, (tau, kills, false) in self.glob.result().items():
                self.tau[k] = tau
                self.counts["global"][k] = [kills, false]

    def result(self, layer: int) -> LayerResult:
        res = LayerResult(
            layer=layer,
            num_neurons=self.n,
            phi_l=self.phi_l.float().cpu(),
            phi_not_l=self.phi_not_l.float().cpu(),
            l_star=self.lstar.cpu(),
            sample=self.sample,
            ks_stat=None,
            ks_pvalue=None,
            mean=self.mean.float().cpu(),
            var=self.var.float().cpu(),
        )
        if self.ks_phi:
            res.ks_stat, res.ks_pvalue = ks_statistics(
                torch.cat(self.ks_phi), torch.cat(self.ks_lab), res.l_star[self.sample]
            )
        for m in self.modes:
            res.fkr[m] = {k: fkrlib.FKRResult(k, m, *self.counts[m][k]).fkr for k in self.ks}
            res.kills[m] = {k: self.counts[m][k][0] for k in self.ks}
        res.tau = {k: float(t) for k, t in self.tau.items()}
        return res


def ks_statistics(phi: torch.Tensor, labels: torch.Tensor, l_star: torch.Tensor) -> tuple:
    """K-S statistic and p-value per column (scipy.stats.ks_2samp): phi[:, m] on tokens of label l_star[m]
    vs phi[:, m] on all tokens."""
    from scipy.stats import ks_2samp

    phi_np, lab_np = phi.double().numpy(), labels.numpy()
    stats, pvals = np.full(phi.shape[1], np.nan), np.full(phi.shape[1], np.nan)
    for m in range(phi.shape[1]):
        own = phi_np[lab_np == int(l_star[m]), m]
        if own.size == 0:
            continue
        r = ks_2samp(own, phi_np[:, m], method="asymp")  # the exact p-value is slow for thousands of samples
        stats[m], pvals[m] = r.statistic, r.pvalue
    return torch.from_numpy(stats).float(), torch.from_numpy(pvals).float()


def scan_model(
    model, data: LabelledTokens, opts: Optional[ScanOptions] = None, name: str = "model", path: str = ""
) -> ScanResult:
    """Both passes over ``data`` for one model; see the module docstring."""
    opts = opts or ScanOptions()
    blocks = model.gpt_neox.layers
    layers = opts.validate(len(blocks))
    device = next(model.parameters()).device
    T, C = data.num_tokens, len(data.label_names)
    n = blocks[0].mlp.dense_h_to_4h.weight.shape[0]
    gen = torch.Generator().manual_seed(opts.seed)
    ks_mask = None
    if opts.compute_ks:
        pick = torch.randperm(T, generator=gen)[: min(opts.ks_tokens, T)]
        ks_mask = torch.zeros(T, dtype=torch.bool)
        ks_mask[pick] = True
        ks_mask = ks_mask.to(device)
    acc = {i: _LayerAccumulator(n, C, T, opts, device, i, ks_mask) for i in layers}
    passes = 3 if opts.fkr_modes else 2
    forward_mlp_activations(
        model,
        data,
        layers,
        opts.batch_size,
        lambda i, z, lab, idx: acc[i].add_moments(z),
        desc=f"{name} pass 1/{passes} (mean, var)",
        progress=opts.progress,
    )
    for a in acc.values():
        a.finish_moments()
    forward_mlp_activations(
        model,
        data,
        layers,
        opts.batch_size,
        lambda i, z, lab, idx: acc[i].add_phi(z, lab, idx),
        desc=f"{name} pass 2/{passes} (phi per label)",
        progress=opts.progress,
    )
    for a in acc.values():
        a.finish_phi()
    if opts.fkr_modes:
        forward_mlp_activations(
            model,
            data,
            layers,
            opts.batch_size,
            lambda i, z, lab, idx: acc[i].add_kills(z, lab, idx),
            desc=f"{name} pass 3/3 (FKR)",
            progress=opts.progress,
        )
        for a in acc.values():
            a.finish_kills()
    results = [acc[i].result(i) for i in layers]
    num_params = (
        model.num_parameters() if hasattr(model, "num_parameters") else sum(p.numel() for p in model.parameters())
    )
    return ScanResult(
        name=name,
        num_parameters=int(num_params),
        num_layers=len(blocks),
        label_names=data.label_names,
        tokens_per_label=data.tokens_per_label(),
        layers=results,
        path=path,
        options={
            "batch_size": opts.batch_size,
            "neuron_sample": opts.neuron_sample,
            "ks_tokens": opts.ks_tokens if opts.compute_ks else 0,
            "fkr_k_percent": [float(k) for k in opts.fkr_ks],
            "fkr_modes": list(opts.fkr_modes),
            "seed": opts.seed,
            "num_tokens": T,
            "stats": "dataset mean and unbiased variance per neuron",
        },
    )
