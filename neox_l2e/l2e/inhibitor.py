"""Inhibitor: the life cycle shared by L2E and MEmeL on one MLP layer (methods.py holds the two; state.py the
buffers and their host mirrors).

One training micro-batch:

    z = inhibitor(x, W, b, approximate)   # z = GELU(x W^T + b) (MEmeL: top-k reflected); sets loss / loss_sum /
                                          # n_selected; leaves this batch's moments pending (first forward only)
    (loss + lambda * l2e_loss).backward()
    inhibitor.commit()                    # DP-merge the pending moments in rank order, fold them in, move tau

A forward needs no host synchronisation; commit copies two numbers back (``commit_device`` + ``commit_host``:
a caller may batch that copy over layers and its own flags, as ``controller.commit_all`` does).
"""

from __future__ import annotations

import warnings
from typing import List, Optional

import torch
import torch.nn.functional as TF

from . import stats
from .backend import TorchBackend, choose_backend
from .metrics import MetricsWindow
from .plan import Pass, Pending, Phase
from .state import InhibitorState


class Inhibitor(InhibitorState):
    """The forward skeleton, commit and metrics shared by L2E and MEmeL (one TP rank of one MLP layer).

    After a forward: ``loss`` (0-dim fp32, TP-global mean of L_MS over the selected entries; None when nothing
    could be selected, and for MEmeL), ``loss_sum`` (TP-global sum of L_MS), ``rows`` (token rows of this
    rank), ``n_selected`` (TP-global selected count; MEmeL: this rank's k).
    """

    #: rows of z scored for the phi-based metrics on the Triton path (the kernel does not return phi)
    metrics_rows: int = 1024
    method = "none"

    def __init__(self, num_neurons: int, cfg, ps, layer_index: int):
        super().__init__(num_neurons, cfg, ps, layer_index)
        self.ratio = float(cfg.l2e_ratio)
        self.eps = float(cfg.l2e_eps)
        self.decay = None if cfg.l2e_decay is None else float(cfg.l2e_decay)
        self.levels = [float(v) for v in (cfg.l2e_reference_levels or [])]
        self.backend = choose_backend(cfg.l2e_backend, getattr(ps, "device", None))
        self.torch_backend = self.backend if isinstance(self.backend, TorchBackend) else TorchBackend()
        self.loss: Optional[torch.Tensor] = None
        self.loss_sum: Optional[torch.Tensor] = None
        self.n_selected: Optional[torch.Tensor] = None
        self.rows = 0
        self._pending: Optional[Pending] = None
        self._committing: Optional[Pending] = None
        self._window: Optional[MetricsWindow] = None

    def _on_load(self) -> None:
        self._pending = None

    # ------------------------------------------------------------------ forward
    def phase(self) -> Phase:
        raise NotImplementedError

    def forward(
        self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], approximate: str = "none"
    ) -> torch.Tensor:
        """z = GELU(x W^T + b) [..., N] (MEmeL: top-k reflected in training)."""
        self._sync()
        x2d = x.reshape(-1, x.shape[-1])
        T = x2d.shape[0]
        if T == 0:
            return TF.gelu(TF.linear(x, weight, bias), approximate=approximate)
        if not self.training:
            kind = Pass.EVAL
        elif self._pending is None:
            kind = Pass.FIRST
        else:
            kind = Pass.RECOMPUTE
            if self._pending.rows != T:
                warnings.warn(
                    f"L2E layer {self.layer_index}: a forward of {T} rows while a micro-batch of "
                    f"{self._pending.rows} rows is pending; was commit() called after the last backward?",
                    stacklevel=2,
                )
        z = self._forward(x2d, weight, bias, approximate, self.phase(), kind)
        return z.reshape(*x.shape[:-1], z.shape[-1])

    def _forward(self, x, weight, bias, approximate, phase: Phase, kind: Pass) -> torch.Tensor:
        raise NotImplementedError

    def _reusable_selection(self, kind: Pass, rows: int, phase: Phase) -> Optional[torch.Tensor]:
        """The pending micro-batch's selection when this forward is its recompute (same rows and phase), else None."""
        pend = self._pending
        if kind is not Pass.RECOMPUTE or pend is None or pend.rows != rows or pend.phase is not phase:
            return None
        return pend.selection

    def _record(self, loss=None, loss_sum=None, n_selected=None, rows=0) -> None:
        self.loss, self.loss_sum, self.n_selected, self.rows = loss, loss_sum, n_selected, rows

    # ------------------------------------------------------------------ commit / discard / metrics
    def discard(self) -> None:
        """Drop the pending micro-batch without a commit (the loop's NaN/inf skip). Local: call on every rank."""
        self._pending = None
        self._record()

    def commit(self) -> None:
        """Fold the pending micro-batch into the statistics and move tau. Collective (TP and DP): every rank
        calls it after every training micro-batch's backward. No-op when nothing is pending."""
        vals = self.commit_device()
        if vals is not None:
            self.commit_host(vals.tolist())

    @torch.no_grad()
    def commit_device(self, ok: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """The device part of commit (collectives, no host synchronisation). ``ok``: a 0-dim bool tensor,
        False = keep the state as it is (a NaN/inf micro-batch). Returns the fp64 [2] values for
        ``commit_host`` (None when nothing is pending)."""
        pend, self._pending = self._pending, None
        self._committing = pend
        if pend is None:
            return None
        batch = stats.gather_merge_dp(self.ps, *pend.moments)
        cnt, mean, m2 = stats.fold((self.count, self.mean, self.m2), batch, self.decay)
        dev = self.mean.device
        sel = pend.n_selected if pend.n_selected is not None else torch.zeros((), device=dev)
        counts = torch.stack(
            [sel.to(torch.float64).reshape(()), torch.full((), pend.n_eligible, dtype=torch.float64, device=dev)]
        )
        self.ps.all_reduce_tp(counts)
        self.ps.all_reduce_dp(counts)
        tau = self._next_tau(pend, counts)

        def put(buf, new):
            buf.copy_(new.to(buf.dtype) if ok is None else torch.where(ok, new.to(buf.dtype), buf))

        put(self.count, cnt)
        put(self.mean, mean)
        put(self.m2, m2)
        put(self.commits, self.commits + 1)
        if pend.n_selected is not None:  # a selecting micro-batch
            put(self.total_selected, self.total_selected + counts[0])
            put(self.total_eligible, self.total_eligible + counts[1])
        if tau is not None:
            put(self.tau, tau)
        self._update_inv_var()
        return self._host_values()

    def _next_tau(self, pend: Pending, counts: torch.Tensor) -> Optional[torch.Tensor]:
        """tau after this micro-batch (fp32 0-dim), or None to keep it. counts = global (selected, eligible)."""
        return None

    def commit_host(self, values: List[float], ok: bool = True) -> None:
        """The host part of commit: mirror (count, tau) and add the micro-batch's metrics (when ``ok``)."""
        pend, self._committing = self._committing, None
        self._count_host, self._tau_host = float(values[0]), float(values[1])
        if ok and pend is not None and pend.metrics is not None:
            if self._window is None:
                self._window = MetricsWindow(self.num_neurons, self.levels, self.mean.device)
            self._window.add(pend.metrics)

    def metrics(self) -> dict:
        """Global metrics since the last call (then reset); see ``MetricsWindow.reduce``. Collective over TP
        and DP. On the Triton path the phi-based values come from a strided sample of ``metrics_rows`` rows."""
        self._sync()
        window = self._window or MetricsWindow(self.num_neurons, self.levels, self.mean.device)
        self._window = None
        return window.reduce(self.ps, self._tau_host)

    def extra_repr(self) -> str:
        return (
            f"layer={self.layer_index}, neurons={self.num_neurons}, method={self.method}, p={self.ratio}, "
            f"backend={self.backend.name}"
        )
