"""InhibitorState: the buffers of one inhibited layer and their host mirrors (no math, no collectives).

Buffers (state_dict; identical on all data-parallel replicas):
    count [N] fp64   samples seen per neuron (fp64: beyond fp32's exact integers; decayed counts)
    mean  [N] fp32   running mean of z;  m2 [N] fp32   running sum of squared deviations
    tau   ()  fp32   moving threshold (+inf until initialised; MEmeL: always +inf)
    step  ()  int64  optimizer step last given to set_step (warm-up survives a reload)
    commits () int64 micro-batches committed
    total_selected / total_eligible () fp64   selected / eligible activations of selecting micro-batches (TP x DP)
    inv_var [N] fp32 (not saved) 1 / var where eligible, else 0; derived from (count, m2)

What decides a forward (is a neuron eligible, is warm-up over, is tau set, tau) is mirrored on the host from
these buffers, identical on every rank, so a forward needs no host synchronisation.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from . import functional


class InhibitorState(nn.Module):
    """Buffers and host mirrors of the N = 4h/tp neurons of one TP rank of one MLP layer.

    ``cfg`` is an L2EConfig (validated by the config loader); ``ps`` a ParallelState.
    """

    def __init__(self, num_neurons: int, cfg, ps, layer_index: int):
        super().__init__()
        self.num_neurons, self.cfg, self.ps, self.layer_index = int(num_neurons), cfg, ps, int(layer_index)
        self.min_samples = max(int(cfg.l2e_min_samples), 2)
        self.warmup_steps = int(cfg.l2e_warmup_steps)
        dev = getattr(ps, "device", None)  # where the model builds its layers
        n = self.num_neurons
        for name, shape, dtype, fill in (
            ("count", (n,), torch.float64, 0.0),
            ("mean", (n,), torch.float32, 0.0),
            ("m2", (n,), torch.float32, 0.0),
            ("tau", (), torch.float32, math.inf),
            ("step", (), torch.int64, 0),
            ("commits", (), torch.int64, 0),
            ("total_selected", (), torch.float64, 0.0),
            ("total_eligible", (), torch.float64, 0.0),
        ):
            self.register_buffer(name, torch.full(shape, fill, dtype=dtype, device=dev))
        self.register_buffer("inv_var", torch.zeros(n, dtype=torch.float32, device=dev), persistent=False)
        self._count_host, self._tau_host, self._step_host = 0.0, math.inf, 0
        self._host_stale = False

    # ------------------------------------------------------------------ dtypes, host mirrors
    def _apply(self, fn, recurse=True):
        """Buffers follow device moves but keep their dtypes (``model.half()`` must not round the statistics:
        an fp16 count saturates at 65504): a cast buffer is replaced by the uncast one on the new device."""
        before = {k: v for k, v in self._buffers.items() if v is not None}
        super()._apply(fn, recurse)
        for k, old in before.items():
            new = self._buffers[k]
            if new is not None and new.dtype != old.dtype:
                self._buffers[k] = old.to(device=new.device)
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._host_stale = True
        self._on_load()

    def _host_values(self) -> torch.Tensor:
        """(count of neuron 0, tau) as fp64 [2]: what the host mirrors (count is the same for every neuron)."""
        c = (
            self.count[:1].reshape(())
            if self.num_neurons
            else torch.zeros((), dtype=torch.float64, device=self.tau.device)
        )
        return torch.stack([c, self.tau.to(torch.float64)])

    def _sync(self) -> None:
        """Re-read the host mirrors after load_state_dict (one synchronisation)."""
        if self._host_stale:
            self._count_host, self._tau_host = self._host_values().tolist()
            self._step_host = int(self.step)
            self._update_inv_var()
            self._host_stale = False

    @property
    def eligible(self) -> bool:
        """Neurons hold enough samples to be scored."""
        self._sync()
        return self._count_host >= self.min_samples

    @property
    def active(self) -> bool:
        """Selection may happen: eligible and warm-up over."""
        self._sync()
        return self.eligible and self._step_host >= self.warmup_steps

    @property
    def tau_value(self) -> float:
        self._sync()
        return self._tau_host

    def set_tau(self, tau: float) -> None:
        """Set tau (buffer and host mirror), e.g. to start a test far from the quantile."""
        self.tau.fill_(tau)
        self._tau_host = float(self.tau)

    def set_step(self, step: int) -> None:
        """Optimizer step (no selection before l2e_warmup_steps)."""
        self._sync()
        self._step_host = int(step)
        self.step.fill_(int(step))

    def _on_load(self) -> None:
        """Called after load_state_dict (subclasses drop what was pending)."""

    def _update_inv_var(self) -> None:
        self.inv_var.copy_(functional.inv_var_from_stats(self.count, self.m2, self.min_samples))
