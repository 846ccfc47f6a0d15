"""The loss reduction (l2e-loss-reduction) and the gradient path switch (l2e-grad-to-input), torch backend."""

import pytest
import torch
import torch.nn.functional as TF
from l2e_common import batch, layer_inputs, make_inhibitor, run_stream

from neox_l2e.config import ConfigError, build_config
from neox_l2e.l2e import L2EController, total_loss
from neox_l2e.l2e.torch_op import up_gelu_l2e
from neox_l2e.model import GPTNeoX


def _selecting_layers(n_layers, p, t, n, reduction="selected-mean"):
    """``n_layers`` inhibitors past tau initialisation and one more forward of t rows; their per-entry weights."""
    w, b = layer_inputs(n=n)
    wp = w.clone().requires_grad_()
    inhs = [make_inhibitor(n=n, l2e_ratio=p) for _ in range(n_layers)]
    for i, inh in enumerate(inhs):
        run_stream(inh, w, b, steps=3, t=t, seed0=10 * i)
        inh(batch(t, seed=500 + i), wp, b, "none")
        assert inh.n_selected is not None and inh.n_selected.item() > 0
    total = total_loss(inhs, reduction)
    # the weight of one selected entry's log((z - mean)^2 + eps) in the total = d total / d (layer's L_MS sum)
    weights = torch.autograd.grad(total, [inh.loss_sum for inh in inhs])
    return inhs, [float(g) for g in weights]


def test_selected_mean_weight_is_one_over_selected_times_layers():
    inhs, weights = _selecting_layers(3, 0.02, 128, 32)
    for inh, wgt in zip(inhs, weights):
        assert wgt == pytest.approx(1.0 / (inh.n_selected.item() * 3), rel=1e-6)


def test_token_sum_weight_is_one_over_tokens():
    _, weights = _selecting_layers(3, 0.02, 128, 32, "token-sum")
    assert weights == pytest.approx([1.0 / 128] * 3, rel=1e-6)


@pytest.mark.parametrize("change", [dict(n_layers=4), dict(p=0.06), dict(t=384), dict(n=96)])
def test_weights_scale_as_documented(change):
    """selected-mean: weight ~ 1 / (n_layers p T N); token-sum: 1 / T, whatever n_layers, p and N (docs/l2e.md)."""
    base = dict(n_layers=2, p=0.02, t=128, n=32)
    new = {**base, **change}
    for reduction in ("selected-mean", "token-sum"):
        _, w0 = _selecting_layers(**base, reduction=reduction)
        _, w1 = _selecting_layers(**new, reduction=reduction)
        ratio = (sum(w0) / len(w0)) / (sum(w1) / len(w1))
        if reduction == "token-sum":
            expected = new["t"] / base["t"]
            assert ratio == pytest.approx(expected, rel=1e-6), (reduction, change, ratio)
        else:
            expected = 1.0
            for k in ("n_layers", "p", "t", "n"):
                expected *= new[k] / base[k]
            # n_selected tracks p T N up to the threshold's per-batch noise
            assert ratio == pytest.approx(expected, rel=0.35), (reduction, change, ratio)


def test_unknown_reduction_is_one_config_error():
    with pytest.raises(ConfigError, match="l2e-loss-reduction"):
        build_config(
            dict(
                num_layers=2,
                hidden_size=32,
                num_attention_heads=4,
                seq_length=16,
                vocab_size=64,
                l2e_enabled=True,
                l2e_loss_reduction="sum",
            )
        )


def _grads(lam, grad_to_input, x, w, b, inh):
    xg, wg, bg = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    inh.grad_to_input = grad_to_input
    z = inh(xg, wg, bg, "none")
    lm = (z.float() * torch.linspace(-1, 1, z.shape[-1])).pow(2).mean()
    loss = lm + lam * inh.loss if lam else lm
    loss.backward()
    inh.discard()
    return xg.grad, wg.grad, bg.grad


def test_grad_to_input_false_leaves_the_lm_gradient_of_x_bit_identical():
    w, b = layer_inputs()
    inh = make_inhibitor()
    run_stream(inh, w, b, steps=4)
    x = batch(64, seed=9)
    gx0, gw0, gb0 = _grads(0.0, True, x, w, b, inh)  # lambda = 0: the LM gradient alone
    gx1, gw1, gb1 = _grads(0.5, False, x, w, b, inh)
    gx2, gw2, _ = _grads(0.5, True, x, w, b, inh)
    assert inh.loss is None and inh.n_selected is None  # discarded; the forward did select:
    assert torch.equal(gx1, gx0)  # no L2E gradient reaches x
    assert not torch.equal(gx2, gx0)  # (it does with the switch on)
    # W and b get the L2E term either way: the same gradient up to summation order
    torch.testing.assert_close(gw1, gw2, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(gw1, gw0, rtol=1e-4, atol=1e-6)
    # and it is the gradient of lambda * L_MS with respect to W
    wg = w.clone().requires_grad_()
    inh(x, wg, b, "none")
    (0.5 * inh.loss).backward()
    inh.discard()
    torch.testing.assert_close(gw1 - gw0, wg.grad, rtol=1e-4, atol=1e-6)


def test_grad_to_input_false_in_the_model_keeps_earlier_layers_lm_gradients():
    """Layer 1 inhibited, lambda large: with the switch off every parameter below layer 1's MLP up-projection
    (layer 0, the embeddings, layer 1's attention and norms) gets bit-identically the gradient of lambda = 0."""
    keys = dict(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        seq_length=16,
        vocab_size=64,
        make_vocab_size_divisible_by=8,
        l2e_enabled=True,
        l2e_layers=[1],
        l2e_min_samples=8,
        l2e_backend="torch",
        l2e_ratio=0.05,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        gpt_j_residual=False,
    )
    grads = {}
    for name, lam, to_input in (("lm", 0.0, True), ("off", 5.0, False), ("on", 5.0, True)):
        model = GPTNeoX(build_config(dict(keys, l2e_lambda=lam, l2e_grad_to_input=to_input))).train()
        gen = torch.Generator().manual_seed(0)
        for _ in range(3):
            tok = torch.randint(0, 64, (2, 17), generator=gen)
            model.zero_grad()
            out = model(tok[:, :-1])
            l2e = model.l2e.loss()
            loss = model.lm_loss(out.logits, tok[:, 1:])
            if l2e is not None and lam:
                loss = loss + model.l2e.loss_term(l2e)
            loss.backward()
            model.l2e.end_micro_batch(ok=True)
        assert l2e is not None
        grads[name] = {k: p.grad.clone() for k, p in model.named_parameters()}
    up = "gpt_neox.layers.1.mlp.dense_h_to_4h."
    below = [
        k
        for k in grads["lm"]
        if k.startswith(("gpt_neox.layers.0.", "gpt_neox.embed_in"))
        or k.startswith("gpt_neox.layers.1.")
        and ".mlp." not in k
    ]
    assert below
    for k in below:
        assert torch.equal(grads["off"][k], grads["lm"][k]), k
    assert any(not torch.equal(grads["on"][k], grads["lm"][k]) for k in below)
    for k in (up + "weight", up + "bias"):
        assert not torch.allclose(grads["off"][k], grads["lm"][k]), k


def test_torch_op_grad_switch_matches_a_detached_input():
    """up_gelu_l2e(grad_to_input=False): the loss's gradients equal those of the loss computed from x.detach()."""
    w, b = layer_inputs()
    mean, inv_var = torch.zeros(32), torch.ones(32)
    x = batch(64, seed=4)
    grads = []
    for detach_x, to_input in ((False, False), (True, True)):
        xg, wg, bg = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
        r = up_gelu_l2e(xg.detach() if detach_x else xg, wg, bg, mean, inv_var, 0.5, 1e-6, grad_to_input=to_input)
        r.loss_sum.backward()
        grads.append((xg.grad, wg.grad, bg.grad))
    assert grads[0][0] is None and grads[1][0] is None
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grads[0][2], grads[1][2], rtol=1e-6, atol=1e-7)


def test_eval_without_selection_runs_the_plain_mlp(monkeypatch):
    """K4: in eval, while tau is unset (or the layer not eligible), no statistics path runs; MEmeL likewise."""
    import neox_l2e.l2e.backend as backend

    calls = []
    real = backend.up_gelu_l2e
    monkeypatch.setattr(backend, "up_gelu_l2e", lambda *a, **k: calls.append(1) or real(*a, **k))
    w, b = layer_inputs()
    for method in ("l2e", "memel"):
        inh = make_inhibitor(l2e_method=method, l2e_min_samples=10_000).eval()
        with torch.no_grad():
            z = inh(batch(64), w, b, "none")
        torch.testing.assert_close(z, TF.gelu(TF.linear(batch(64), w, b)), rtol=0, atol=0)
    assert not calls
    inh = make_inhibitor()
    run_stream(inh, w, b, steps=1)  # eligible, tau still +inf (the next training batch sets it)
    calls.clear()
    inh.eval()
    inh(batch(64), w, b, "none")
    assert not calls and inh.loss is None
    inh.train()
    inh(batch(64), w, b, "none")  # training: the statistics path runs (it gathers the moments)
    assert calls


def test_controller_is_the_loop_door():
    w, b = layer_inputs()
    inhs = [make_inhibitor(), make_inhibitor()]
    inhs[1].layer_index = 1
    ctl = L2EController(inhs, lam=0.25)
    for step in range(4):
        ctl.begin_step(step)
        for inh in inhs:
            inh(batch(64, seed=step), w, b, "none")
        if step == 3:
            torch.testing.assert_close(ctl.loss_term(), 0.25 * total_loss(inhs))
        ctl.end_micro_batch(ok=step != 2)  # micro-batch 2 is dropped
    assert all(int(inh.commits) == 3 and int(inh.step) == 3 for inh in inhs)
    m = ctl.metrics()
    assert set(m) == {0, 1} and all(v["batches"] == 1.0 for v in m.values())  # the dropped one is not counted
