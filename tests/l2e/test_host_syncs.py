"""At most one device-to-host copy per training micro-batch from our code, L2E on (gas 1 and 2): the NaN /
interrupt flags and every inhibited layer's commit values travel together (issue M, item 1).

Counted by wrapping the tensor-to-host calls (tolist, item, float/int/bool, cpu) made directly by code in neox_l2e;
the optimizer step's own copies (DeepSpeed internals) are not ours. ``numpy()`` is not counted: it is a view of a
CPU tensor and raises on a CUDA one, so it can never be a hidden device synchronisation (the CPU sweep of the torch
path uses it)."""

import collections
import sys
import traceback
from pathlib import Path

import pytest
from distributed import run_ranks

HOST_CALLS = ("tolist", "item", "__float__", "__int__", "__bool__", "__index__", "cpu")


def _worker(rank, world, gas):
    import torch

    from neox_l2e.training.loop import Trainer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
    from train_common import datasets, tiny_cfg

    tr = Trainer(
        tiny_cfg(train_iters=20, gas=gas, l2e_enabled=True, l2e_min_samples=8), datasets=datasets(), quiet=True
    )
    orig = {n: getattr(torch.Tensor, n) for n in HOST_CALLS}
    calls = []

    def wrap(name):
        def call(self, *a, **k):
            caller = traceback.extract_stack(limit=2)[0]
            if "neox_l2e" in caller.filename:
                calls.append(f"{caller.filename.rsplit('neox_l2e', 1)[-1]}:{caller.lineno}:{name}")
            return orig[name](self, *a, **k)

        return call

    per_step, phases = [], []
    for n in HOST_CALLS:
        setattr(torch.Tensor, n, wrap(n))
    try:
        for _ in range(5):  # statistics, tau initialisation, then selecting steps
            calls.clear()
            tr.train_step()
            per_step.append(collections.Counter(calls))
            phases.append([inh.phase().value for inh in tr.module.inhibitors()])
    finally:
        for n in HOST_CALLS:
            setattr(torch.Tensor, n, orig[n])
    return per_step, phases, tr._own_grad_norm


@pytest.mark.parametrize("gas", [1, 2])
def test_one_host_copy_per_micro_batch_with_l2e(gas):
    per_step, phases, own_norm = run_ranks(_worker, world=1, args=(gas,))[0]
    assert phases[-1] == ["select", "select"], phases  # the inhibitors got to selecting
    for counts in per_step:
        l2e = {k: v for k, v in counts.items() if k.startswith(("/l2e/", "/model/"))}
        assert not l2e, counts  # the L2E path itself never copies to the host
        flags = sum(v for k, v in counts.items() if k.startswith("/training/loop.py") and k.endswith(":tolist"))
        assert flags == gas, counts  # one copy per micro-batch for flags + L2E values
        # besides: the step's own gradient norm (fp32 without ZeRO), once per step
        assert sum(counts.values()) <= gas + int(own_norm), counts


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("method", ["l2e", "memel"])
def test_inhibitor_micro_batch_does_not_synchronise_on_cuda(backend, method):
    """Forward, backward and the device part of commit of a selecting micro-batch run under
    torch.cuda.set_sync_debug_mode("error"); the one allowed copy (the host values) comes after."""
    import torch
    from l2e_common import batch, layer_inputs, make_inhibitor

    from neox_l2e.l2e import L2EController, commit_devices, finish_commits
    from neox_l2e.parallel import ParallelState

    if backend == "triton":
        pytest.importorskip("triton")
    dev = torch.device("cuda")
    ps = ParallelState.single(dev)
    inhs = [make_inhibitor(n=256, ps=ps, l2e_backend=backend, l2e_method=method) for _ in range(2)]
    w, b = (t.to(dev).requires_grad_() for t in layer_inputs(h=64, n=256))
    xs = [batch(512, h=64, seed=s).to(dev) for s in range(5)]
    ok = torch.ones((), dtype=torch.bool, device=dev)
    ctl = L2EController(inhs, lam=0.1)
    for i, x in enumerate(xs):  # statistics, tau initialisation, then selecting micro-batches
        check = i == len(xs) - 1
        if check:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            z = sum(inh(x, w, b, "none").float().pow(2).mean() for inh in inhs)
            term = ctl.loss_term()
            (z + term if term is not None else z).backward()
            vals = commit_devices(inhs, ok)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        finish_commits(inhs, vals.tolist())
    assert all(inh.phase().value == "select" for inh in inhs)
