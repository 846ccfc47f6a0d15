"""The MLP's up-projection op: chosen once at construction (plain GELU or the L2E inhibitor), both run through
ColumnParallelLinear's own forward (its TP input handling and its module hooks), the state_dict keys stay
``dense_h_to_4h.*`` / ``inhibitor.*``, and a forward hook on ``up_op`` sees z, the input of ``dense_4h_to_h``."""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from neox_l2e.config.schema import L2EConfig
from neox_l2e.l2e import NeuronInhibitor
from neox_l2e.model.mlp import MLP, GELUUp, InhibitedUp
from neox_l2e.parallel import ColumnParallelLinear, ParallelState

H, FFN = 8, 32


def _mlp(method=None, approximate="none", seed=0) -> MLP:
    ps = ParallelState.single()
    inhibitor = None
    if method:
        cfg = dataclasses.replace(
            L2EConfig(), l2e_enabled=True, l2e_method=method, l2e_backend="torch", l2e_min_samples=8, l2e_ratio=0.1
        )
        inhibitor = NeuronInhibitor(FFN, cfg, ps, layer_index=0)
    m = MLP(H, FFN, ps, approximate=approximate, inhibitor=inhibitor)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / 3)
    return m


def _x(seed=1):
    return torch.randn(2, 12, H, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", [None, "l2e", "memel"])
def test_the_op_is_chosen_at_construction_and_adds_no_state(method):
    m = _mlp(method)
    assert type(m.up_op) is (GELUUp if method is None else InhibitedUp)
    keys = list(m.state_dict())
    assert keys[:4] == ["dense_h_to_4h.weight", "dense_h_to_4h.bias", "dense_4h_to_h.weight", "dense_4h_to_h.bias"]
    assert all(k.startswith("inhibitor.") for k in keys[4:])
    assert bool(keys[4:]) == (method is not None)
    assert not any(k.startswith("up_op") for k in keys)
    if method:
        assert m.up_op._inhibitor is m.inhibitor
        twin = copy.deepcopy(m)  # the op's reference follows the copy of the registered inhibitor
        assert twin.up_op._inhibitor is twin.inhibitor and twin.inhibitor is not m.inhibitor


@pytest.mark.parametrize("method", [None, "l2e", "memel"])
@pytest.mark.parametrize("training", [False, True])
def test_both_paths_go_through_column_parallel_linear(method, training, monkeypatch):
    """Whatever ColumnParallelLinear does to its input (here: a doubling stand-in for a new TP input path),
    both ops see it, and dense_h_to_4h is called as a module (its hooks fire: ZeRO-3 gathers there)."""
    m = _mlp(method).train(training)
    x = _x()
    seen = []
    real = ColumnParallelLinear.scatter_input

    def doubled(self, inp):
        seen.append(inp)
        return real(self, inp) * 2.0

    monkeypatch.setattr(ColumnParallelLinear, "scatter_input", doubled)
    calls = []
    m.dense_h_to_4h.register_forward_pre_hook(lambda mod, args: calls.append(1))
    zs = []
    m.up_op.register_forward_hook(lambda mod, args, z: zs.append(z))
    with torch.no_grad():
        m(x)
    assert len(seen) == 1 and seen[0] is x and calls == [1]
    up = m.dense_h_to_4h
    want = F.gelu(F.linear(2.0 * x, up.weight, up.bias))
    if method == "memel" and training:  # top-k reflected: |z| is the plain GELU's
        torch.testing.assert_close(zs[0].abs(), want.abs(), rtol=1e-5, atol=1e-6)
    else:
        torch.testing.assert_close(zs[0], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", [None, "l2e"])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_forward_hook_on_up_op_sees_z(method, approximate):
    """The hook's z is the MLP's activation: GELU(x W^T + b), exactly what dense_4h_to_h receives."""
    m = _mlp(method, approximate).train()
    x = _x(seed=5)
    got, into_down = [], []
    h1 = m.up_op.register_forward_hook(lambda mod, args, z: got.append(z.detach().clone()))
    h2 = m.dense_4h_to_h.register_forward_pre_hook(lambda mod, args: into_down.append(args[0].detach().clone()))
    out = m(x)
    h1.remove()
    h2.remove()
    up = m.dense_h_to_4h
    z = F.gelu(F.linear(x, up.weight, up.bias), approximate=approximate)
    assert got[0].shape == (2, 12, FFN)
    torch.testing.assert_close(got[0], z.detach(), rtol=1e-5, atol=1e-6)
    assert torch.equal(got[0], into_down[0])
    torch.testing.assert_close(out, m.dense_4h_to_h(z), rtol=1e-5, atol=1e-6)
    if method:
        assert m.inhibitor._pending is not None  # the inhibitor ran on this forward (its moments are pending)
        m.inhibitor.discard()
    m(x)
    assert len(got) == 1  # removed handles: no more calls


def test_the_op_cannot_be_swapped_after_construction():
    m = _mlp("l2e")
    with pytest.raises(AttributeError, match="inhibitor="):
        m.inhibitor = None
    with pytest.raises(AttributeError, match="inhibitor="):
        _mlp().up_op = GELUUp()
