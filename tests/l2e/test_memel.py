"""MEmeL baseline: exactly k activations per batch (largest phi) are reflected about the neuron's mean."""

import torch
import torch.nn.functional as TF
from l2e_common import batch, layer_inputs, make_inhibitor, run_stream

from neox_l2e.l2e import functional as F


def test_memel_reflects_exactly_the_topk_by_phi():
    w, b = layer_inputs(n=32)
    p = 0.03
    inh = make_inhibitor(n=32, l2e_method="memel", l2e_ratio=p)
    seen = []
    run_stream(inh, w, b, steps=3, t=64, collect=seen)
    for step in range(4):
        x = batch(100, seed=40 + step).requires_grad_()
        mean, inv_var = inh.mean.clone(), inh.inv_var.clone()
        out = inh(x, w, b, "none")
        assert inh.loss is None
        z = TF.gelu(TF.linear(x.detach(), w, b))
        seen.append(z)
        changed = out.detach() != z
        k = round(p * z.numel())
        assert int(changed.sum()) == k == int(inh.n_selected)
        torch.testing.assert_close(out.detach()[changed], (2 * mean.expand_as(z) - z)[changed], rtol=0, atol=1e-6)
        phi = F.phi(z, mean, inv_var)
        assert phi[changed].min() >= phi[~changed].max()  # they are the top k
        # reverse deactivation reverses the gradient of the selected entries
        zz = z.clone().requires_grad_()
        F.reverse_deactivate(zz, mean, changed).sum().backward()
        assert torch.equal(zz.grad, torch.where(changed, -1.0, 1.0))
        out.sum().backward()
        inh.commit()
    assert inh.count[0].item() == 3 * 64 + 4 * 100
    # the statistics fold the neurons' own outputs (before the reflection)
    torch.testing.assert_close(inh.mean.double(), torch.cat(seen).double().mean(0), rtol=0, atol=1e-6)
    assert torch.isinf(inh.tau)  # MEmeL has no moving threshold
    m = inh.metrics()
    assert abs(m["frac_selected"] - p) < 1e-3


def test_memel_inactive_in_eval_and_before_eligible():
    w, b = layer_inputs()
    inh = make_inhibitor(l2e_method="memel", l2e_min_samples=1000)
    x = batch(64)
    out = inh(x, w, b, "none")
    torch.testing.assert_close(out, TF.gelu(TF.linear(x, w, b)), rtol=0, atol=0)
    inh.commit()
    inh2 = make_inhibitor(l2e_method="memel")
    run_stream(inh2, w, b, steps=3)
    inh2.eval()
    out = inh2(x, w, b, "none")
    torch.testing.assert_close(out, TF.gelu(TF.linear(x, w, b)), rtol=0, atol=0)
