"""Moving threshold (init, convergence, warm-up) and the inhibition loss (closed-form gradients)."""

import math

import pytest
import torch
import torch.nn.functional as TF
from l2e_common import batch, layer_inputs, make_inhibitor, run_stream

from neox_l2e.l2e import functional as F
from neox_l2e.l2e import total_loss


def test_tau_initialised_to_exact_quantile_of_first_eligible_batch():
    w, b = layer_inputs(n=32)
    inh = make_inhibitor(n=32, l2e_min_samples=64, l2e_ratio=0.03)
    run_stream(inh, w, b, steps=1, t=64)  # statistics only: not eligible before this commit
    assert math.isinf(inh.tau_value) and inh.loss is None
    x = batch(64, seed=99)
    mean, inv_var = inh.mean.clone(), inh.inv_var.clone()
    inh(x, w, b, "none")
    assert inh.loss is None  # the initialising batch selects nothing
    inh.commit()
    z = TF.gelu(TF.linear(x, w, b))
    phi = F.phi(z, mean, inv_var)
    k = max(1, round(0.03 * phi.numel()))
    assert inh.tau_value == torch.topk(phi.flatten(), k).values[-1].item()
    assert inh.tau.item() == inh.tau_value


def test_numeric_tau_init():
    w, b = layer_inputs()
    inh = make_inhibitor(l2e_tau_init=7.5)
    run_stream(inh, w, b, steps=2)  # eligible after the first commit; the second sets tau
    assert inh.tau_value == 7.5
    run_stream(inh, w, b, steps=1)  # then the update moves it
    assert inh.tau_value != 7.5


@pytest.mark.parametrize("p", [0.01, 0.03])
def test_threshold_converges_on_stationary_stream(p):
    w, b = layer_inputs(h=12, n=64)
    inh = make_inhibitor(n=64, l2e_ratio=p, l2e_eta=0.05)
    # start far from the quantile: the update has to find it
    run_stream(inh, w, b, steps=2, t=256)
    inh.set_tau(inh.tau_value * 20.0)
    run_stream(inh, w, b, steps=300, t=256, seed0=10)
    inh.metrics()  # reset the window
    run_stream(inh, w, b, steps=100, t=256, seed0=1000)
    frac = inh.metrics()["frac_selected"]
    assert abs(frac - p) / p < 0.10, frac


def test_warmup_blocks_selection_but_gathers_statistics():
    w, b = layer_inputs()
    inh = make_inhibitor(l2e_warmup_steps=3)
    for step in range(6):
        inh.set_step(step)
        inh(batch(64, seed=step), w, b, "none")
        if step < 3:
            assert inh.loss is None
        inh.commit()
        if step < 3:
            assert math.isinf(inh.tau_value)
    assert inh.count[0].item() == 6 * 64
    assert inh.loss is not None and not math.isinf(inh.tau_value)


def test_functional_loss_gradient_is_two_over_deviation():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(40, 8, generator=g, dtype=torch.float32).requires_grad_()
    mean = (0.1 * torch.randn(8, generator=g)).requires_grad_()  # must receive no gradient
    inv_var = torch.rand(8, generator=g) + 0.5
    with torch.no_grad():
        z[0, 0] = mean[0]  # z == mean on an unselected entry: no NaN at eps = 0
    mask = F.select(z.detach(), mean.detach(), inv_var, 1.0)
    assert mask.any() and (~mask).any() and not mask[0, 0]
    loss = F.inhibition_loss_sum(z, mean, mask, eps=0.0)
    loss.backward()
    d = (z.detach() - mean.detach()).double()
    expected = torch.where(mask, 2.0 / d, torch.zeros_like(d))
    torch.testing.assert_close(z.grad.double(), expected, rtol=1e-6, atol=0)
    assert mean.grad is None
    torch.testing.assert_close(loss.double(), torch.log(d[mask] ** 2).sum(), rtol=1e-6, atol=0)


def test_inhibitor_loss_value_and_gradient_closed_form():
    """L_MS = mean over selected of log((z - mean)^2): check it and dL/dW, dL/db, dL/dx in fp64."""
    w, b = layer_inputs(h=12, n=32)
    inh = make_inhibitor(n=32, l2e_eps=0.0)
    run_stream(inh, w, b, steps=5, t=64)
    x = batch(64, seed=77).requires_grad_()
    wp, bp = w.clone().requires_grad_(), b.clone().requires_grad_()
    mean, inv_var, tau = inh.mean.clone(), inh.inv_var.clone(), inh.tau_value
    count_before = inh.count.clone()
    inh(x, wp, bp, "none")
    loss = inh.loss
    assert loss.dtype == torch.float32 and loss.dim() == 0
    loss.backward()
    # fp64 closed form
    u = x.detach().double() @ w.double().t() + b.double()
    z = TF.gelu(u)
    d = z - mean.double()
    mask = F.select(TF.gelu(TF.linear(x.detach(), w, b)), mean, inv_var, tau)
    n = mask.sum().item()
    assert n > 0
    torch.testing.assert_close(loss.double(), torch.log(d[mask] ** 2).sum() / n, rtol=1e-5, atol=1e-6)
    dz = torch.where(mask, 2.0 / d, torch.zeros_like(d)) / n
    cdf = 0.5 * (1 + torch.erf(u / math.sqrt(2)))
    pdf = torch.exp(-0.5 * u * u) / math.sqrt(2 * math.pi)
    du = dz * (cdf + u * pdf)
    torch.testing.assert_close(wp.grad.double(), du.t() @ x.detach().double(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(bp.grad.double(), du.sum(0), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), du @ w.double(), rtol=1e-4, atol=1e-6)
    # statistics are buffers without grad and untouched by forward / backward
    assert all(not t.requires_grad for t in inh.buffers())
    assert torch.equal(inh.count, count_before) and torch.equal(inh.mean, mean)
    inh.commit()


def test_forward_output_is_plain_gelu_and_eval_changes_nothing():
    w, b = layer_inputs()
    inh = make_inhibitor()
    run_stream(inh, w, b, steps=4)
    x = batch(64, seed=5).reshape(2, 32, 12)
    z = inh(x, w, b, "tanh")
    torch.testing.assert_close(z, TF.gelu(TF.linear(x, w, b), approximate="tanh"), rtol=0, atol=0)
    inh.commit()
    state = {k: v.clone() for k, v in inh.state_dict().items()}
    inh.eval()
    with torch.no_grad():
        inh(x, w, b, "none")
    assert inh.loss is not None  # the loss is still reported in eval, nothing else happens
    inh.commit()  # nothing pending
    assert all(torch.equal(state[k], v) for k, v in inh.state_dict().items())


def test_total_loss_averages_layers_that_selected():
    w, b = layer_inputs()
    a, c = make_inhibitor(), make_inhibitor()
    run_stream(a, w, b, steps=4)
    run_stream(c, w, b, steps=4)
    x = batch(64, seed=3)
    a(x, w, b, "none")
    c(x, w, b, "none")
    torch.testing.assert_close(total_loss([a, c], "selected-mean"), (a.loss + c.loss) / 2)
    c.n_selected = torch.zeros(())  # a layer that selected nothing
    c.loss = torch.zeros(())
    torch.testing.assert_close(total_loss([a, c], "selected-mean"), a.loss)
    assert total_loss([make_inhibitor()]) is None
    assert total_loss([make_inhibitor()], "selected-mean") is None


def test_bf16_inputs_give_the_plain_mlp_output_and_fp32_loss():
    w, b = layer_inputs()
    inh = make_inhibitor()
    wb, bb = w.bfloat16().requires_grad_(), b.bfloat16()
    for s in range(4):
        x = batch(64, seed=s).bfloat16()
        z = inh(x, wb, bb, "tanh")
        assert z.dtype == torch.bfloat16
        assert torch.equal(z, TF.gelu(TF.linear(x, wb, bb), approximate="tanh"))
        if inh.loss is not None:
            assert inh.loss.dtype == torch.float32 and torch.isfinite(inh.loss)
            inh.loss.backward()
        inh.commit()
    assert inh.mean.dtype == torch.float32 and inh.loss is not None and wb.grad.dtype == torch.bfloat16
