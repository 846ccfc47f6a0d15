"""TP=2 against TP=1 on the same weights: logits, vocab-parallel loss and every gradient (2 gloo ranks)."""

import pytest
import torch
from distributed import run_ranks
from tp_common import gather_states, grads_of, random_full_state, tiny_cfg, tokens, tp_model

VARIANTS = {
    "pythia": dict(),  # parallel residual, untied, biases
    "sequential-tied": dict(gpt_j_residual=False, no_weight_tying=False),
    "no-attn-bias-erf": dict(use_bias_in_attn_linear=False, bias_gelu_fusion=False, gpt_j_tied=True),
    "hidden-dropout": dict(hidden_dropout=0.2),  # shared RNG stream: same masks as TP=1
}


def _compare(cfg, ps, train: bool):
    from neox_l2e.parallel import ParallelState

    full = random_full_state(cfg)
    batch = tokens(cfg)
    x, y = batch[:, :-1], batch[:, 1:]
    out = {}
    for name, state in (("tp1", ParallelState.single()), ("tp2", ps)):
        model = tp_model(cfg, state, full).train(train)
        if name == "tp2":
            model.ps.rng.seed(123, ps.tp_rank)
        else:
            model.ps.rng.seed(123, 0)
        o = model(x)
        loss = model.lm_loss(o.logits, y)
        loss.backward()
        logits = model.full_logits(o.logits).detach()
        grads = grads_of(model)
        if name == "tp2":
            grads = gather_states(grads, ps, cfg)
        out[name] = (logits, loss.detach(), grads)
    (l1, loss1, g1), (l2, loss2, g2) = out["tp1"], out["tp2"]
    assert l1.shape == l2.shape == (*x.shape, 104)
    assert set(g1) == set(g2)
    return dict(
        logits=(l1 - l2).abs().max().item(),
        loss=(loss1 - loss2).abs().item(),
        loss1=loss1.item(),
        grads=max((g1[k] - g2[k]).abs().max().item() for k in g1),
        grad_scale=max(g1[k].abs().max().item() for k in g1),
        bias_grad=(g1["gpt_neox.layers.0.mlp.dense_4h_to_h.bias"] - g2["gpt_neox.layers.0.mlp.dense_4h_to_h.bias"])
        .abs()
        .max()
        .item(),
    )


def _row_parallel(ps):
    """RowParallelLinear split over the TP group against one nn.Linear with the same weights and a nonzero bias:
    output, input gradient, this rank's weight-gradient columns and the bias gradient."""
    from neox_l2e.parallel import RowParallelLinear

    gen = torch.Generator().manual_seed(5)
    ref = torch.nn.Linear(8, 4)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(4, 8, generator=gen))
        ref.bias.copy_(torch.randn(4, generator=gen) + 3.0)  # nonzero, far from 0
    x = torch.randn(3, 8, generator=gen, requires_grad=True)
    g = torch.randn(3, 4, generator=gen)
    y_ref = ref(x)
    y_ref.backward(g)
    row = RowParallelLinear(8, 4, ps)
    cols = slice(ps.tp_rank * 4, (ps.tp_rank + 1) * 4)
    with torch.no_grad():
        row.weight.copy_(ref.weight[:, cols])
        row.bias.copy_(ref.bias)
    x_local = x.detach()[:, cols].clone().requires_grad_(True)  # this rank's slice of the input
    y = row(x_local)
    y.backward(g)
    return dict(
        out=(y - y_ref).abs().max().item(),
        bias_shift=(y - y_ref).mean().item(),
        x_grad=(x_local.grad - x.grad[:, cols]).abs().max().item(),
        w_grad=(row.weight.grad - ref.weight.grad[:, cols]).abs().max().item(),
        b_grad=(row.bias.grad - ref.bias.grad).abs().max().item(),
        bias=ref.bias.abs().min().item(),
    )


def _worker(rank, world):
    from neox_l2e.parallel import ParallelState

    torch.manual_seed(0)
    ps = ParallelState.from_distributed(tp=2)
    results = {"row_parallel": _row_parallel(ps)}
    for name, extra in VARIANTS.items():
        results[name] = _compare(tiny_cfg(model_parallel_size=2, **extra), ps, train=name == "hidden-dropout")
    return results


@pytest.fixture(scope="module")
def tp2_results():
    return run_ranks(_worker, world=2)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tp2_matches_tp1(tp2_results, variant):
    for rank, res in enumerate(tp2_results):
        r = res[variant]
        assert r["logits"] <= 1e-5, (rank, r)
        assert r["loss"] <= 1e-5, (rank, r)
        assert r["grads"] <= 1e-5, (rank, r)
        assert r["grad_scale"] > 1e-3 and r["loss1"] > 1.0  # the comparison is not vacuous


def test_row_parallel_bias_added_once(tp2_results):
    """RowParallelLinear on 2 ranks equals nn.Linear: the partial products are summed and the bias is added once
    (NeoX adds it on every rank, which would shift every output by (tp - 1) x bias)."""
    for rank, res in enumerate(tp2_results):
        r = res["row_parallel"]
        assert r["bias"] > 0.5, r  # the bias is not vacuous
        assert r["out"] <= 1e-5 and abs(r["bias_shift"]) <= 1e-5, (rank, r)
        assert r["x_grad"] <= 1e-5 and r["w_grad"] <= 1e-5, (rank, r)
        assert r["b_grad"] <= 1e-6, (rank, r)  # the replicated bias gets the full gradient
