"""The two inhibition methods on top of ``Inhibitor``: L2E (moving threshold + loss) and MEmeL (per-batch
top-k + reverse deactivation), and ``NeuronInhibitor``, which builds the one the config names."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as TF

from . import functional as F
from . import stats as S
from .backend import TorchBackend
from .inhibitor import Inhibitor
from .metrics import BatchMetrics
from .plan import Pass, Pending, Phase
from .threshold import Threshold


def _plain(x, weight, bias, approximate):
    return TF.gelu(TF.linear(x, weight, bias), approximate=approximate)


class L2EInhibitor(Inhibitor):
    """L2E: selected = phi >= tau (no sort); loss = log((z - mean)^2 + eps) over the selected entries."""

    method = "l2e"

    def __init__(self, num_neurons: int, cfg, ps, layer_index: int):
        super().__init__(num_neurons, cfg, ps, layer_index)
        self.threshold = Threshold(cfg.l2e_ratio, cfg.l2e_eta, cfg.l2e_tau_init)
        self.grad_to_input = bool(getattr(cfg, "l2e_grad_to_input", True))

    def phase(self) -> Phase:
        if not self.active:
            return Phase.GATHER
        return Phase.INIT_TAU if math.isinf(self._tau_host) else Phase.SELECT

    def _forward(self, x, weight, bias, approximate, phase: Phase, kind: Pass) -> torch.Tensor:
        if kind is Pass.EVAL and phase is not Phase.SELECT:  # nothing to score or gather
            self._record()
            return _plain(x, weight, bias, approximate)
        select = phase is Phase.SELECT
        backend = self.torch_backend if phase is Phase.INIT_TAU else self.backend  # the quantile needs phi
        extra = {}
        if isinstance(backend, TorchBackend):
            reuse = self._reusable_selection(kind, x.shape[0], phase) if select else None
            extra = dict(selection=reuse, level_bound=min(self.levels) if self.levels else None)
        r = backend(
            x,
            weight,
            bias,
            self.mean,
            self.inv_var,
            self._tau_host if select else None,
            self.eps,
            approximate,
            grad_to_input=self.grad_to_input,
            moments=kind is Pass.FIRST,
            score=phase is Phase.INIT_TAU or (select and kind is not Pass.RECOMPUTE),
            **extra,
        )
        T = x.shape[0]
        n_sel = r.n_sel.detach().to(torch.float64) if select else None
        if select:
            from ..parallel import reduce_from_tp

            n_tp = self.ps.all_reduce_tp(n_sel.clone())
            loss_sum = reduce_from_tp(r.loss_sum, self.ps)
            loss = loss_sum / n_tp.clamp_min(1.0).to(torch.float32)  # also in a recompute: the same saved tensors
            if kind is not Pass.RECOMPUTE:  # a recompute keeps the loss of the first forward (the one in the graph)
                self._record(loss, loss_sum, n_tp, T)
        elif kind is not Pass.RECOMPUTE:
            self._record()
        if kind is Pass.FIRST:
            self._pending = Pending(
                rows=T,
                phase=phase,
                moments=r.moments,
                n_selected=n_sel,
                n_eligible=float(T * self.num_neurons) if phase is not Phase.GATHER else 0.0,
                init_phi=r.phi if phase is Phase.INIT_TAU and self.threshold.from_quantile else None,
                metrics=self._metrics(r, n_sel, T) if select else None,
                selection=r.sel,  # gather form only (the masked form recomputes its mask: no T x N kept)
            )
        return r.z

    def _metrics(self, r, n_sel, T) -> BatchMetrics:
        if r.sel is not None:  # the torch path's gather form
            return BatchMetrics.of_selection(r, n_sel, T, self.num_neurons, self.levels, self.loss)
        phi, mask = r.phi, r.mask
        if phi is None:  # Triton path: score a strided row sample of z (documented estimate)
            stride = max(1, -(-T // self.metrics_rows))
            phi = F.phi(r.z[::stride].detach(), self.mean, self.inv_var)
            mask = phi >= self._tau_host
        return BatchMetrics.of(phi, mask, n_sel, T, self.num_neurons, self.levels, self.loss)

    def _next_tau(self, pend: Pending, counts: torch.Tensor) -> Optional[torch.Tensor]:
        if pend.phase is Phase.INIT_TAU:
            return Threshold.stored(self.threshold.initial(pend.init_phi, counts[1], self.ps))
        if pend.phase is Phase.SELECT:
            return Threshold.stored(self.threshold.updated(self.tau, counts[0], counts[1]))
        return None

    def extra_repr(self) -> str:
        return super().extra_repr() + f", eta={self.threshold.eta}, grad_to_input={self.grad_to_input}"


class MEmeLInhibitor(Inhibitor):
    """MEmeL: in training, the k = round(p * T * N) largest phi of this rank's batch are reflected about the
    neuron's mean, z' = 2 mean - z. Scores phi on the fp32 z of the torch path on every backend. The selection
    (``functional.scan`` on CPU, a top-k over all entries elsewhere) is made once per micro-batch: an
    activation-checkpointing recompute reuses it."""

    method = "memel"

    def phase(self) -> Phase:
        return Phase.SELECT if self.active else Phase.GATHER

    def _forward(self, x, weight, bias, approximate, phase: Phase, kind: Pass) -> torch.Tensor:
        self._record()
        if kind is Pass.EVAL:  # MEmeL inhibits in training only
            return _plain(x, weight, bias, approximate)
        select = phase is Phase.SELECT
        T = x.shape[0]
        reuse = self._reusable_selection(kind, T, phase) if select else None
        r = self.torch_backend(
            x,
            weight,
            bias,
            self.mean,
            self.inv_var,
            None,
            self.eps,
            approximate,
            moments=kind is Pass.FIRST,
            score=select and kind is not Pass.RECOMPUTE,
            top_k=S.kth_index(self.ratio, T * self.num_neurons) if select else None,
            selection=reuse,
            level_bound=min(self.levels) if self.levels else None,
        )
        n_sel = None
        if select:
            n_sel = r.n_sel.to(torch.float64)
            self.n_selected = n_sel
        if kind is Pass.FIRST:
            metrics = None
            if select:
                metrics = (
                    BatchMetrics.of_selection(r, n_sel, T, self.num_neurons, self.levels, None)
                    if r.sel is not None
                    else BatchMetrics.of(r.phi, r.mask, n_sel, T, self.num_neurons, self.levels, None)
                )
            self._pending = Pending(
                rows=T,
                phase=phase,
                moments=r.moments,
                n_selected=n_sel,
                n_eligible=float(T * self.num_neurons) if select else 0.0,
                metrics=metrics,
                selection=r.selection if select else None,
            )
        return r.z


METHODS = {"l2e": L2EInhibitor, "memel": MEmeLInhibitor}


def NeuronInhibitor(num_neurons: int, cfg, ps, layer_index: int) -> Inhibitor:  # noqa: N802 - a constructor
    """The inhibitor of ``cfg.l2e_method`` (l2e or memel) for one TP rank's ``num_neurons`` of layer ``layer_index``."""
    method = str(cfg.l2e_method).lower()
    if method not in METHODS:
        raise ValueError(f"l2e-method {cfg.l2e_method!r} builds no inhibitor (use l2e or memel)")
    return METHODS[method](num_neurons, cfg, ps, layer_index)
