"""The Triton backend (fused kernel; Triton's interpreter on CPU) against the torch backend."""

import pytest
import torch
from l2e_common import batch, layer_inputs, make_inhibitor

kernels = pytest.importorskip("neox_l2e.kernels.l2e_mlp")
pytest.importorskip("triton")

DEVICES = [
    pytest.param(
        "cpu", marks=pytest.mark.skipif(not kernels.interpreter_enabled(), reason="CPU needs TRITON_INTERPRET=1")
    ),
    pytest.param("cuda", marks=pytest.mark.gpu),
]


def _run(device, bias_grad, method="l2e", steps=6):
    w, b = layer_inputs(12, 48)
    w = w.to(device).requires_grad_()
    b = b.to(device).requires_grad_(bias_grad)
    out = {}
    for backend in ("torch", "triton"):
        inh = make_inhibitor(n=48, l2e_backend=backend, l2e_method=method).to(device)
        zs, losses, grads = [], [], []
        for s in range(steps):
            x = batch(64, seed=s).to(device)
            z = inh(x, w, b, "none")
            loss = z.float().pow(2).mean() + (inh.loss if inh.loss is not None else 0.0)
            (gw,) = torch.autograd.grad(loss, w)
            inh.commit()
            zs.append(z.detach())
            losses.append((inh.loss.item(), inh.loss_sum.item()) if inh.loss is not None else None)
            grads.append(gw)
        out[backend] = (zs, losses, grads, inh, inh.metrics())
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["l2e", "memel"])
def test_triton_backend_matches_torch_backend(device, method):
    out = _run(device, bias_grad=True, method=method)
    (zt, lt, gt, it, mt), (zk, lk, gk, ik, mk) = out["torch"], out["triton"]
    for a, b in zip(zt, zk):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert [x is None for x in lt] == [x is None for x in lk]
    for a, b in zip(lt, lk):
        if a is not None:  # the mean L_MS and the sum that the token-sum reduction divides by the tokens
            assert all(abs(u - v) <= 1e-4 * max(1.0, abs(u)) for u, v in zip(a, b)), (a, b)
    for a, b in zip(gt, gk):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ik.mean, it.mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(ik.m2, it.m2, rtol=1e-5, atol=1e-6)
    assert torch.equal(ik.count, it.count)
    torch.testing.assert_close(ik.tau, it.tau, rtol=1e-5, atol=0)
    assert abs(mk["frac_selected"] - mt["frac_selected"]) < 2e-3


@pytest.mark.parametrize("device", DEVICES)
def test_triton_backend_with_frozen_bias(device):
    out = _run(device, bias_grad=False)
    for a, b in zip(out["torch"][2], out["triton"][2]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_triton_backend_passes_the_gradient_switch():
    """l2e-grad-to-input reaches the fused op as its l2e_grad_to_input kwarg, both ways."""
    from neox_l2e.l2e.backend import TritonBackend

    seen = {}

    def op_with(x, weight, bias, mean, inv_var, tau, eps, approximate="none", mode="split", *, l2e_grad_to_input=True):
        seen["flag"] = l2e_grad_to_input
        return kernels.l2e_mlp_reference(
            x, weight, bias, mean, inv_var, tau, eps, approximate, grad_to_input=l2e_grad_to_input
        )

    w, b = layer_inputs(12, 48)
    args = (batch(16), w, b, torch.zeros(48), torch.ones(48), 0.5, 1e-6, "none")
    TritonBackend(op_with)(*args, grad_to_input=False)
    assert seen["flag"] is False
    TritonBackend(op_with)(*args)
    assert seen["flag"] is True
