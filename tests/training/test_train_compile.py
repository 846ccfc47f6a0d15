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
