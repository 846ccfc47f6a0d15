"""NeuronInhibitor: the L2E (and MEmeL baseline) unit attached to one inhibited MLP.

Life cycle of one micro-batch (training mode):

    z = inhibitor(x, W, b, approximate)   # z = GELU(x W^T + b); scores phi against the statistics as they
                                          # stand; L2E: self.loss = mean over selected of log((z-mean)^2+eps)
                                          # MEmeL: the per-batch top-k by phi are reflected, z' = 2 mean - z
                                          # stashes this batch's moments as "pending" (once per micro-batch)
    (loss + lambda * l2e_loss).backward()
    inhibitor.commit()                    # DP-merge pending moments in rank order, fold them in, update tau

Everything that decides what a forward does (is a neuron eligible, is warm-up over, is tau initialised,
the value of tau) is mirrored on the host from buffers that are identical on every rank, so forward
needs no host synchronisation; commit synchronises once (one small device-to-host copy).

Buffers (in state_dict; identical on all data-parallel replicas):
    count [N] fp64   samples seen per neuron (fp64: a run sees ~1e10 token rows, beyond fp32's exact
                     integers; counts of non-power-of-two batches would drift in fp32)
    mean  [N] fp32   running mean of z
    m2    [N] fp32   running sum of squared deviations (var = m2 / (count - 1))
    tau   ()  fp32   moving threshold; +inf until initialised
    step  ()  int64  optimizer step last given to set_step (warm-up survives a reload)
    commits ()          int64  micro-batches committed
    total_selected ()   fp64   selected activations, summed over TP and DP and all selecting micro-batches
    total_eligible ()   fp64   eligible activations of those micro-batches, likewise
"""
from __future__ import annotations

import math
import warnings
from typing import Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as TF

from . import functional as F
from . import stats as S

TAU_MIN, TAU_MAX = 1e-30, 1e30  # tau stays finite and positive once initialised

_warned_triton = False
_kernel_fn = None  # the fused op once imported; False when it cannot be


def _warn_triton_once(err: BaseException) -> None:
    global _warned_triton
    if not _warned_triton:
        _warned_triton = True
        warnings.warn(f"L2E: the Triton kernel could not be imported ({err!r}); using the torch backend.")


def _f32(x: float) -> float:
    """Round a python float to the nearest fp32 value (the host mirror of tau equals its fp32 buffer)."""
    return float(torch.tensor(x, dtype=torch.float32))


class NeuronInhibitor(nn.Module):
    """L2E / MEmeL on the N = 4h/tp neurons of one tensor-parallel rank of one MLP layer.

    Args:
        num_neurons: neurons of this TP rank.
        cfg: L2EConfig (l2e_method, l2e_ratio, l2e_eta, l2e_tau_init, l2e_decay, l2e_min_samples,
             l2e_warmup_steps, l2e_eps, l2e_backend, l2e_reference_levels are read).
        ps: ParallelState (TP group: loss and selection counts; DP group: statistics merge).
        layer_index: the layer (for messages and metrics).
    Attributes after forward:
        loss: 0-dim fp32 (with grad in training) = L_MS of this layer, reduced over the TP group; 0 when
              active but nothing was selected; None when inactive (not eligible yet, warm-up, tau being
              initialised) and for MEmeL. ``total_loss`` averages only layers that selected something.
        n_selected: 0-dim fp64, selected activations of this forward summed over the TP group (MEmeL: this
              rank's k), or None.
    """

    #: rows of z scored for the phi-based metrics on the Triton path (the kernel does not return phi)
    metrics_rows: int = 1024

    def __init__(self, num_neurons: int, cfg, ps, layer_index: int):
        super().__init__()
        self.num_neurons = int(num_neurons)
        self.cfg = cfg
        self.ps = ps
        self.layer_index = int(layer_index)
        self.method = str(getattr(cfg, "l2e_method", "l2e")).lower()
        if self.method not in ("l2e", "memel", "none"):
            raise ValueError(f"l2e_method must be l2e, memel or none, got {self.method!r}")
        self.ratio = float(cfg.l2e_ratio)
        if not 0.0 < self.ratio < 1.0:
            raise ValueError(f"l2e_ratio must be in (0, 1), got {self.ratio}")
        self.eta = float(cfg.l2e_eta)
        self.eps = float(cfg.l2e_eps)
        self.decay = None if cfg.l2e_decay is None else float(cfg.l2e_decay)
        if self.decay is not None and not 0.0 < self.decay <= 1.0:
            raise ValueError(f"l2e_decay must be None or in (0, 1], got {self.decay}")
        self.min_samples = max(int(cfg.l2e_min_samples), 2)
        self.warmup_steps = int(cfg.l2e_warmup_steps)
        self.backend = str(cfg.l2e_backend).lower()
        if self.backend not in ("auto", "torch", "triton"):
            raise ValueError(f"l2e_backend must be auto, torch or triton, got {self.backend!r}")
        tau_init = cfg.l2e_tau_init
        self.tau_init = "quantile" if tau_init in (None, "quantile") else float(tau_init)
        if self.tau_init != "quantile" and not self.tau_init > 0:
            raise ValueError(f"l2e_tau_init must be 'quantile' or a positive number, got {tau_init!r}")
        self.levels = [float(v) for v in (cfg.l2e_reference_levels or [])]

        n = self.num_neurons
        dev = getattr(ps, "device", None)   # where the model builds its layers (moved later with the module)
        self.register_buffer("count", torch.zeros(n, dtype=torch.float64, device=dev))
        self.register_buffer("mean", torch.zeros(n, dtype=torch.float32, device=dev))
        self.register_buffer("m2", torch.zeros(n, dtype=torch.float32, device=dev))
        self.register_buffer("tau", torch.full((), math.inf, dtype=torch.float32, device=dev))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64, device=dev))
        self.register_buffer("commits", torch.zeros((), dtype=torch.int64, device=dev))
        self.register_buffer("total_selected", torch.zeros((), dtype=torch.float64, device=dev))
        self.register_buffer("total_eligible", torch.zeros((), dtype=torch.float64, device=dev))
        # derived from (count, m2); recomputed after every change, not saved
        self.register_buffer("inv_var", torch.zeros(n, dtype=torch.float32, device=dev), persistent=False)

        # host mirrors of buffers (identical on all ranks), refreshed by commit and load_state_dict
        self._count_host = 0.0
        self._tau_host = math.inf
        self._step_host = 0
        self._host_stale = False

        self.loss: Optional[torch.Tensor] = None
        self.n_selected: Optional[torch.Tensor] = None
        self._pending: Optional[dict] = None
        self._acc: Optional[dict] = None  # metrics accumulators (device tensors)

    # ------------------------------------------------------------------ dtype / device moves
    def _apply(self, fn, recurse=True):
        """Buffers follow the module's device moves but keep their dtypes: ``model.half()``, ``.bfloat16()``
        or an engine's low-precision cast must not round the statistics (an fp16 count saturates at 65504).
        A cast buffer is replaced by the original, uncast tensor moved to the new device (lossless)."""
        before = {k: v for k, v in self._buffers.items() if v is not None}
        super()._apply(fn, recurse)
        for k, old in before.items():
            new = self._buffers[k]
            if new is not None and new.dtype != old.dtype:
                self._buffers[k] = old.to(device=new.device)
        return self

    # ------------------------------------------------------------------ host state
    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._host_stale = True
        self._pending = None

    def _refresh_host(self) -> None:
        """Re-read the host mirrors from the buffers (after load_state_dict; one synchronisation)."""
        vals = torch.stack([self.count[:1].to(torch.float64).reshape(()) if self.num_neurons else
                            torch.zeros((), dtype=torch.float64, device=self.tau.device),
                            self.tau.to(torch.float64), self.step.to(torch.float64)]).tolist()
        self._count_host, self._tau_host, self._step_host = vals[0], vals[1], int(vals[2])
        self._update_inv_var()
        self._host_stale = False

    def _update_inv_var(self) -> None:
        self.inv_var.copy_(F.inv_var_from_stats(self.count, self.m2, self.min_samples))

    def _sync(self) -> None:
        if self._host_stale:
            self._refresh_host()

    @property
    def eligible(self) -> bool:
        """Neurons hold enough samples to be scored (count is the same for every neuron)."""
        self._sync()
        return self._count_host >= self.min_samples

    @property
    def active(self) -> bool:
        """Selection may happen in this forward: eligible, warm-up over, method not 'none'."""
        self._sync()
        return self.method != "none" and self.eligible and self._step_host >= self.warmup_steps

    @property
    def tau_value(self) -> float:
        self._sync()
        return self._tau_host

    def set_step(self, step: int) -> None:
        """Optimizer step (no selection before l2e_warmup_steps)."""
        self._sync()
        self._step_host = int(step)
        self.step.fill_(int(step))

    # ------------------------------------------------------------------ forward
    def _use_triton(self, x: torch.Tensor) -> bool:
        return self.backend == "triton" or (self.backend == "auto" and x.is_cuda)

    def _kernel(self):
        """The fused Triton op, or None (import failed once: warn, and use torch from then on)."""
        global _kernel_fn
        if _kernel_fn is None:
            try:
                from neox_l2e.kernels.l2e_mlp import fused_up_gelu_l2e
                _kernel_fn = fused_up_gelu_l2e
            except Exception as err:  # noqa: BLE001 - any import failure falls back
                _warn_triton_once(err)
                _kernel_fn = False
        return _kernel_fn or None

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                approximate: str = "none") -> torch.Tensor:
        """z = GELU(x W^T + b) [..., N] (MEmeL: with the top-k reflected); sets self.loss / self.n_selected;
        in training mode stashes this micro-batch's moments for commit() (once: a second forward before
        commit is taken for the activation-checkpointing recompute and has no side effects)."""
        global _kernel_fn
        self._sync()
        lead = x.shape[:-1]
        x2d = x.reshape(-1, x.shape[-1])
        T = x2d.shape[0]
        training = self.training
        first = training and self._pending is None and T > 0
        if training and not first and self._pending is not None and self._pending["rows"] != T:
            warnings.warn(f"L2E layer {self.layer_index}: a forward of {T} rows while a micro-batch of "
                          f"{self._pending['rows']} rows is pending; was commit() called after the last backward?")
        if self.method == "none":
            self.loss, self.n_selected = None, None
            return TF.gelu(TF.linear(x, weight, bias), approximate=approximate)

        active = self.active
        l2e = self.method == "l2e"
        init_tau = l2e and active and math.isinf(self._tau_host)   # this batch initialises tau: no selection
        selecting = active and not init_tau and (l2e or training)  # MEmeL inhibits in training only
        tau = self._tau_host if (selecting and l2e) else math.inf
        mean, inv_var = self.mean, self.inv_var

        phi = mask = loss_sum = n_sel = None
        out = None
        kernel = self._kernel() if (self._use_triton(x) and not init_tau and T > 0) else None
        if kernel is not None:
            try:
                z2d, loss_sum, n_sel_k, (bcount, bmean, bm2) = kernel(x2d, weight, bias, mean, inv_var, tau,
                                                                       self.eps, approximate)
                out = z2d
                n_sel = n_sel_k.to(torch.float64) if (selecting and l2e) else None
            except ImportError as err:   # triton itself missing: the op imports it lazily
                _warn_triton_once(err)
                _kernel_fn = False
        if out is None:
            u = TF.linear(x2d, weight, bias)
            z32 = TF.gelu(u.float(), approximate=approximate)   # fp32 value; z is it rounded to x.dtype
            out = z32.to(x.dtype)
            bcount, bmean, bm2 = F.batch_moments(z32) if first else (None, None, None)
            if active:
                phi = F.phi(z32.detach(), mean, inv_var)
            if selecting and l2e:
                mask = phi >= tau
                loss_sum = F.inhibition_loss_sum(z32, mean, mask, self.eps)
                n_sel = F.count(mask)

        if not l2e:                                   # MEmeL: per-batch top-k, reverse deactivation
            self.loss, self.n_selected = None, None
            if selecting:
                if phi is None:
                    phi = F.phi(out.detach(), mean, inv_var)
                mask = self._topk_mask(phi)
                out = F.reverse_deactivate(out, mean, mask)
                n_sel = F.count(mask)
                self.n_selected = n_sel
        elif selecting:
            n_tp = self.ps.all_reduce_tp(n_sel.detach().clone())
            loss = self._reduce_from_tp(loss_sum) / n_tp.clamp_min(1.0).to(torch.float32)
            if first or not training:   # a recompute keeps the loss of the first forward (the one in the graph)
                self.loss, self.n_selected = loss, n_tp
        elif first or not training:
            self.loss, self.n_selected = None, None

        if first:
            pend = {"rows": T, "count": bcount, "mean": bmean, "m2": bm2, "active": active,
                    "n_sel": n_sel.detach() if selecting else None,
                    "n_elig": float(T * self.num_neurons) if active else 0.0}
            if init_tau and self.tau_init == "quantile":
                pend["init_phi"] = phi
            if selecting:
                pend["metrics"] = self._batch_metrics(out, phi, mask, n_sel, tau)
            self._pending = pend
        return out.reshape(*lead, out.shape[-1])

    def _reduce_from_tp(self, t: torch.Tensor) -> torch.Tensor:
        from ..parallel import reduce_from_tp
        return reduce_from_tp(t, self.ps)

    def _topk_mask(self, phi: torch.Tensor) -> torch.Tensor:
        """MEmeL: exactly k = round(ratio * numel) largest phi of this rank's batch (ties by index order of topk)."""
        flat = phi.reshape(-1)
        k = S.kth_index(self.ratio, flat.numel())
        idx = torch.topk(flat, k, sorted=False).indices
        mask = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
        mask[idx] = True
        return mask.reshape(phi.shape)

    # ------------------------------------------------------------------ metrics
    def _batch_metrics(self, z2d, phi, mask, n_sel, tau) -> dict:
        """This micro-batch's device-side metric sums (no host synchronisation); commit() adds them to the
        running sums since the last metrics() call, discard() drops them."""
        dev = self.mean.device
        if phi is None:  # Triton path: score a strided row sample of z (documented estimate)
            T = z2d.shape[0]
            stride = max(1, -(-T // self.metrics_rows))
            phi = F.phi(z2d[::stride].detach(), self.mean, self.inv_var)
            mask = phi >= tau
        elif mask is None:
            mask = phi >= tau
        T = z2d.shape[0]
        numel = float(T * self.num_neurons)
        sample = float(phi.numel())
        parts = [
            torch.as_tensor(numel, dtype=torch.float64, device=dev),     # eligible activations
            n_sel.detach().to(torch.float64).reshape(()),                 # selected (exact)
            torch.as_tensor(sample, dtype=torch.float64, device=dev),    # scored activations
            phi.sum().to(torch.float64),                                  # sum phi over scored
            torch.where(mask, phi, 0.0).sum().to(torch.float64),          # sum phi over selected (scored)
            F.count(mask),                                                # selected among scored
        ] + [F.count(phi > lv) for lv in self.levels]
        out = {"sums": torch.stack([p.reshape(()) for p in parts]), "hit": mask.any(dim=0)}
        if self.method == "l2e" and self.loss is not None:
            out["loss"] = torch.stack([self.loss.detach().to(torch.float64).reshape(()),
                                       torch.ones((), dtype=torch.float64, device=dev)])
        return out

    def _add_metrics(self, batch: dict) -> None:
        if self._acc is None:
            dev = self.mean.device
            self._acc = {"batches": 0, "sums": torch.zeros_like(batch["sums"]),
                         "hit": torch.zeros(self.num_neurons, dtype=torch.bool, device=dev),
                         "loss": torch.zeros(2, dtype=torch.float64, device=dev)}
        acc = self._acc
        acc["batches"] += 1
        acc["sums"] += batch["sums"]
        acc["hit"] |= batch["hit"]
        if "loss" in batch:
            acc["loss"] += batch["loss"]

    def metrics(self) -> dict:
        """Global metrics since the last call (then reset). A collective over TP and DP: call on every rank.

        frac_selected: selected / eligible activations; tau; loss_ms: mean L_MS over forwards that had a loss;
        phi_mean_selected, phi_mean_all (over eligible activations); frac_phi_gt_<level>; neurons_hit: neurons
        of the whole layer (all TP ranks) selected at least once on any DP rank; batches: selecting micro-batches
        of this rank (the same on every rank). On the Triton path the
        phi-based values (and neurons_hit) come from a strided sample of ``metrics_rows`` rows per forward.
        """
        self._sync()
        dev = self.mean.device
        L = len(self.levels)
        acc = self._acc
        sums = acc["sums"].clone() if acc else torch.zeros(6 + L, dtype=torch.float64, device=dev)
        hit = acc["hit"].to(torch.float64) if acc else torch.zeros(self.num_neurons, dtype=torch.float64, device=dev)
        loss = acc["loss"].clone() if acc else torch.zeros(2, dtype=torch.float64, device=dev)
        self.ps.all_reduce_tp(sums)
        self.ps.all_reduce_dp(sums)
        self.ps.all_reduce_dp(hit, op=torch.distributed.ReduceOp.MAX)
        hits = hit.sum().reshape(1)
        self.ps.all_reduce_tp(hits)
        self.ps.all_reduce_dp(loss)  # self.loss is already TP-global
        vals = torch.cat([sums, hits, loss]).tolist()
        elig, nsel, scored, phi_sum, phi_sel_sum, sel_scored = vals[:6]
        lv = vals[6:6 + L]
        n_hit = vals[6 + L]
        loss_sum, loss_n = vals[7 + L], vals[8 + L]
        nan = float("nan")
        out = {
            "frac_selected": nsel / elig if elig > 0 else nan,
            "tau": self._tau_host,
            "loss_ms": loss_sum / loss_n if loss_n > 0 else nan,
            "phi_mean_selected": phi_sel_sum / sel_scored if sel_scored > 0 else nan,
            "phi_mean_all": phi_sum / scored if scored > 0 else nan,
            "neurons_hit": n_hit,
            "batches": float(acc["batches"] if acc else 0),
        }
        for level, c in zip(self.levels, lv):
            out[f"frac_phi_gt_{level:g}"] = c / scored if scored > 0 else nan
        self._acc = None
        return out

    # ------------------------------------------------------------------ commit / discard
    def discard(self) -> None:
        """Drop the pending micro-batch (statistics, selection counts, metrics) without a commit, as the
        training loop does for a forward whose loss was NaN or inf. Local: call it on every rank alike."""
        self._pending = None
        self.loss, self.n_selected = None, None

    @torch.no_grad()
    def commit(self) -> None:
        """Fold the pending micro-batch into the statistics and move tau. Collective (TP and DP groups):
        every rank calls it after every training micro-batch's backward. No-op when nothing is pending."""
        self._sync()
        pend, self._pending = self._pending, None
        if pend is None:
            return
        if "metrics" in pend:
            self._add_metrics(pend["metrics"])
        ps = self.ps
        dev = self.mean.device
        # 1. statistics: DP merge in rank order, decay, Chan fold (fp64 arithmetic, stored fp32)
        batch = S.gather_merge_dp(ps, pend["count"], pend["mean"], pend["m2"])
        cnt, mean, m2 = S.fold((self.count, self.mean, self.m2), batch, self.decay)

        # 2. global selection counts (TP and DP)
        sel = pend["n_sel"] if pend["n_sel"] is not None else torch.zeros((), device=dev)
        counts = torch.stack([sel.to(torch.float64).reshape(()),
                              torch.as_tensor(pend["n_elig"], dtype=torch.float64, device=dev)])
        ps.all_reduce_tp(counts)
        ps.all_reduce_dp(counts)

        # 3. tau initialisation: exact (1-p) quantile of this batch's phi over all ranks (TP and DP)
        init = None
        if "init_phi" in pend:
            phi = pend["init_phi"]
            k = S.kth_index(self.ratio, int(round(float(counts[1].item()))))

            def _reduce(t):
                ps.all_reduce_tp(t)
                ps.all_reduce_dp(t)
                return t
            init = S.global_kth_largest(phi, k, _reduce if ps.world_size > 1 else None)
        elif pend["active"] and self.method == "l2e" and math.isinf(self._tau_host):
            init = torch.tensor(float(self.tau_init), dtype=torch.float32, device=dev)

        # one host synchronisation for everything the host mirrors need
        host = torch.stack([cnt[0] if cnt.numel() else torch.zeros((), dtype=torch.float64, device=dev),
                            counts[0], counts[1],
                            init.to(torch.float64) if init is not None else torch.zeros((), dtype=torch.float64,
                                                                                        device=dev)]).tolist()
        new_count, n_sel_g, n_elig_g, init_v = host

        self.count.copy_(cnt)
        self.mean.copy_(mean.to(torch.float32))
        self.m2.copy_(m2.to(torch.float32))
        self._count_host = new_count
        self._update_inv_var()
        self.commits += 1
        if pend["n_sel"] is not None:          # a selecting micro-batch (not warm-up or tau initialisation)
            self.total_selected += counts[0]
            self.total_eligible += counts[1]

        if self.method != "l2e" or not pend["active"]:
            return
        if init is not None:
            tau = min(max(init_v, TAU_MIN), TAU_MAX)
        elif n_elig_g > 0 and not math.isinf(self._tau_host):
            frac = n_sel_g / n_elig_g
            tau = self._tau_host * math.exp(self.eta * (frac - self.ratio) / self.ratio)
            tau = min(max(tau, TAU_MIN), TAU_MAX)
        else:
            return
        self._tau_host = _f32(tau)
        self.tau.fill_(self._tau_host)

    def extra_repr(self) -> str:
        return (f"layer={self.layer_index}, neurons={self.num_neurons}, method={self.method}, p={self.ratio}, "
                f"eta={self.eta}, backend={self.backend}")


# ---------------------------------------------------------------------- helpers for the model / loop
def total_loss(inhibitors: Iterable[NeuronInhibitor]) -> Optional[torch.Tensor]:
    """Mean of L_MS over the layers that selected something in this forward (no host synchronisation):
    sum of the layers' losses / number of layers with n_selected > 0 (a layer with none contributes 0).
    None when no layer is active."""
    losses, has = [], []
    for inh in inhibitors:
        if inh.loss is not None and inh.n_selected is not None:
            losses.append(inh.loss)
            has.append((inh.n_selected > 0).to(torch.float32))
    if not losses:
        return None
    return torch.stack(losses).sum() / torch.stack(has).sum().clamp_min(1.0)


def commit_all(inhibitors: Iterable[NeuronInhibitor]) -> None:
    """commit() every inhibitor (in the given, fixed order: the same on every rank)."""
    for inh in inhibitors:
        inh.commit()


def metrics_all(inhibitors: Iterable[NeuronInhibitor], prefix: str = "l2e") -> dict:
    """metrics() of every inhibitor as one flat dict: '<prefix>/layer<i>/<key>'."""
    out = {}
    for inh in inhibitors:
        for k, v in inh.metrics().items():
            out[f"{prefix}/layer{inh.layer_index}/{k}"] = v
    return out
