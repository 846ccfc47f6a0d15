"""A short run on the default corpus: L2E at the default lambda against the same run at lambda = 0.

lambda = 0 is the run without L2E as far as training goes (the inhibition loss adds exactly nothing to
the gradients; tests/training checks that the losses equal an L2E-off run), while its inhibitors still
score and log, so the phi fractions of both runs are measured the same way. The figures of the full
demo-length comparison are in docs/benchmarks.md (tools/l2e_sweep.py).
"""
import sys
from pathlib import Path

from neox_l2e.config.schema import L2EConfig

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import l2e_sweep  # noqa: E402

STEPS = 200


def test_l2e_lowers_the_high_phi_fractions_at_equal_validation_loss(tmp_path):
    lam = L2EConfig().l2e_lambda
    assert lam > 0
    overrides = dict(l2e_sweep.corpus_overrides(tmp_path / "corpus", vocab_size=2000),
                     train_iters=STEPS, eval_interval=STEPS, log_interval=10)
    rows = l2e_sweep.relative(l2e_sweep.sweep([str(ROOT / "configs/local/demo.yml")], [0.0, lam],
                                              tmp_path / "runs", overrides, tail=0.5, log=lambda *a: None))
    base, l2e = rows
    assert base["layers"] == l2e["layers"] == [1, 2]              # mid2 of the 4-layer demo model
    # inhibition: fewer activations far from their neuron's mean, at every reference level
    for level in (5, 10, 25):
        key = f"frac_phi_gt_{level}"
        assert base[key] > 0, key
        assert l2e[key] < base[key], (key, base[key], l2e[key])
    # at (almost) no cost in language modelling
    assert abs(l2e["valid_loss_change_pct"]) <= 2.0, (base["valid_loss"], l2e["valid_loss"])
    # the threshold keeps selecting about p of the activations in both runs
    for r in rows:
        assert 0.5 * 0.02 <= r["frac_selected"] <= 1.5 * 0.02, r
