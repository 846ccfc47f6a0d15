"""Shared helpers for the L2E tests."""

from __future__ import annotations

import dataclasses

import torch

from neox_l2e.config.schema import L2EConfig
from neox_l2e.l2e import NeuronInhibitor
from neox_l2e.parallel import ParallelState


def make_cfg(**kw) -> L2EConfig:
    base = dict(l2e_enabled=True, l2e_backend="torch", l2e_min_samples=8)
    base.update(kw)
    return dataclasses.replace(L2EConfig(), **base)


def make_inhibitor(n=32, ps=None, **kw) -> NeuronInhibitor:
    return NeuronInhibitor(n, make_cfg(**kw), ps or ParallelState.single(), layer_index=0)


def layer_inputs(h=12, n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, h, generator=g) / h**0.5
    b = 0.1 * torch.randn(n, generator=g)
    return w, b


def batch(t, h=12, seed=0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t, h, generator=g) + shift


def run_stream(inh, w, b, steps, t=64, h=12, seed0=0, collect=None):
    """forward + commit ``steps`` micro-batches; optionally collect the fp32 z values fed to the statistics."""
    for i in range(steps):
        x = batch(t, h, seed=seed0 + i)
        z = inh(x, w, b, "none")
        if collect is not None:
            collect.append(torch.nn.functional.gelu(torch.nn.functional.linear(x, w, b)).detach())
        if inh.loss is not None:
            inh.loss.backward() if inh.loss.requires_grad else None
        inh.commit()
        del z
