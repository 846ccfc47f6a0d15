"""compile: true on 2 gloo ranks with ZeRO 1 (gas 2) and ZeRO 2 (L2E on): the same losses, validation and
weights as compile: false, the module compiled in place (same class and state_dict keys), one graph without
L2E and, with it, an inhibited layer's up-projection run eagerly (a graph break); the final validation's
held-out measurement reads forward hooks and runs eagerly. Backend aot_eager (dynamo + AOT autograd, no code
generation) keeps the test short; inductor on CPU compiles C++ (minutes on a small machine)."""

import pytest
from distributed import run_ranks

STEPS = 2


def _worker(rank, world):
    import torch
    from torch._dynamo.utils import counters
    from train_common import datasets, tiny_cfg

    from neox_l2e.training.loop import Trainer

    ds = datasets()
    out = {}
    for stage, extra in ((1, {"gas": 2}), (2, {"l2e_enabled": True})):
        res, before = {}, {}
        for comp in (False, True):
            torch._dynamo.reset()
            counters.clear()
            kw = dict(zero_optimization={"stage": stage}, train_iters=STEPS, lr_decay_iters=STEPS, **extra)
            tr = Trainer(tiny_cfg(compile=comp, compile_backend="aot_eager", **kw), datasets=ds, quiet=True)
            r = tr.train()
            res[comp] = {
                "losses": [l for _, l in r.train_losses],
                "valid": [l for _, l in r.valid_losses],
                "compiled": tr.engine.is_compiled,
                "class": type(tr.module).__name__,
                "keys": sorted(tr.module.state_dict()),
                "graphs": counters["stats"]["unique_graphs"],
                "eager_breaks": sum(v for k, v in counters["graph_break"].items() if "_run_eagerly" in k),
                "breaks": sum(counters["graph_break"].values()),
            }
            weights = {k: v.detach().clone() for k, v in tr.module.state_dict().items()}
            if comp:  # the largest weight difference to the run without compile (tensors stay in this process)
                res[comp]["max_weight_diff"] = max(float((weights[k] - v).abs().max()) for k, v in before.items())
            before = weights
            del tr
        out[stage] = res
    return out


@pytest.fixture(scope="module")
def results():
    return run_ranks(_worker, world=2, timeout=600)


@pytest.mark.parametrize("stage", [1, 2])
def test_compile_gives_the_same_training(results, stage):
    for r in results:
        off, on = r[stage][False], r[stage][True]
        assert len(on["losses"]) == STEPS and on["losses"][-1] < on["losses"][0]
        assert on["losses"] == pytest.approx(off["losses"], rel=1e-5, abs=1e-6)
        assert on["valid"] and on["valid"] == pytest.approx(off["valid"], rel=1e-5, abs=1e-6)
        assert on["max_weight_diff"] <= 1e-5
        assert on["compiled"] and not off["compiled"]
        assert on["class"] == off["class"] == "GPTNeoX" and on["keys"] == off["keys"]  # no _orig_mod. prefix
        assert on["graphs"] > 0 and off["graphs"] == 0  # dynamo captured graphs only with compile on
        if stage == 2:  # L2E on: its up-projection ran eagerly (graph break), per inhibited layer and forward
            assert on["eager_breaks"] > 0
            assert any(".inhibitor." in k for k in on["keys"])
        else:  # L2E off: the whole forward is one graph (no eager L2E loss read-out)
            assert on["breaks"] == 0


def test_compile_keys_are_checked():
    from neox_l2e.config import ConfigError, build_config

    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64)
    assert build_config(base).compile_mode is None
    assert build_config({**base, "compile": True}).compile_mode == "default"
    assert build_config({**base, "compile": "max-autotune"}).compile_mode == "max-autotune"
    for bad in ("fast", 1, None):
        with pytest.raises(ConfigError, match="compile: .* is not supported; use one of false, true, default"):
            build_config({**base, "compile": bad})
    with pytest.raises(ConfigError, match="compile-backend: 'cudagraphs' is not supported"):
        build_config({**base, "compile": True, "compile_backend": "cudagraphs"})
    with pytest.raises(ConfigError, match="compile with ZeRO stage 3 is not supported"):
        build_config({**base, "compile": True, "zero_optimization": {"stage": 3}})
    ckpt = {**base, "compile": True, "checkpoint_activations": True}
    assert build_config(ckpt).compile_mode == "default"  # Pythia's: no attention dropout
    with pytest.raises(ConfigError, match="compile with checkpoint-activations and attention-dropout 0.1"):
        build_config({**ckpt, "attention_dropout": 0.1})


@pytest.mark.parametrize("l2e", [False, True])
def test_compile_with_activation_checkpointing_trains_like_eager(l2e):
    """Pythia's configs checkpoint every layer: compiled (aot_eager), the checkpointed layers give the same
    losses as eager over steps that take L2E through its phases (statistics, tau, selection), bit for bit.
    A custom context_fn cannot run under compile (without L2E it crashed at the first forward): compiled, the
    model uses torch's own checkpoint."""
    import torch
    from train_common import tiny_cfg

    from neox_l2e.l2e import commit_all
    from neox_l2e.model import GPTNeoX
    from neox_l2e.parallel import ParallelState

    cfg = tiny_cfg(checkpoint_activations=True, l2e_enabled=l2e, l2e_min_samples=8)
    torch._dynamo.reset()
    models = [GPTNeoX(cfg, ParallelState.single(torch.device("cpu")), vocab_size=64) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    models[0].compile(backend="aot_eager")
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    g = torch.Generator().manual_seed(0)
    losses = [[], []]
    for _ in range(4):
        x = torch.randint(0, 64, (4, 17), generator=g)
        for i, (m, opt) in enumerate(zip(models, opts)):
            out = m(x[:, :-1])
            loss = m.lm_loss(out.logits, x[:, 1:])
            if out.l2e_loss is not None:
                loss = loss + 0.1 * out.l2e_loss
            loss.backward()
            commit_all(m.inhibitors())
            opt.step()
            opt.zero_grad()
            losses[i].append(loss.item())
    assert losses[0] == losses[1]
    if l2e:
        assert all(inh.phase().value == "select" for m in models for inh in m.inhibitors())
    torch._dynamo.reset()
