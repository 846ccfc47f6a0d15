"""A short run on the default corpus: L2E at the default lambda against the same run at lambda = 0.

What it shows, and what it does not. The phi fractions logged during training (``l2e_train/...``) are taken
against the inhibitor's running statistics; L2E shrinks the inhibited layers' scale below their own
cumulative history, and that alone lowers those fractions. This test asserts that shrinkage, and names it
so: the running-stat fractions fall at every level AND the held-out variance of the inhibited layers falls
well below their running variance (``ms_heldout/.../var_ratio_median``), while at lambda = 0 the two
variances agree. It does not assert that neurons become less monosemantic: on the fixed held-out set
(``ms_heldout/.../frac_phi_gt_*``, statistics fresh on the set) a run this short shows no reliable effect
(docs/l2e.md, "Two kinds of metrics").

lambda = 0 is the run without L2E as far as training goes (the inhibition loss adds exactly nothing to the
gradients), while its inhibitors still score and log, so both runs are measured the same way.
"""

import sys
from pathlib import Path

from neox_l2e.analysis.runs import read_run
from neox_l2e.config.schema import L2EConfig

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import l2e_sweep  # noqa: E402

STEPS = 200


def test_l2e_shrinks_the_running_stat_phi_fractions_and_the_inhibited_layers_scale(tmp_path):
    lam = L2EConfig().l2e_lambda
    assert lam > 0
    overrides = dict(
        l2e_sweep.corpus_overrides(tmp_path / "corpus", vocab_size=2000),
        train_iters=STEPS,
        eval_interval=STEPS,
        log_interval=10,
        ms_heldout_tokens=4096,
    )
    rows = l2e_sweep.relative(
        l2e_sweep.sweep(
            [str(ROOT / "configs/local/demo.yml")],
            [0.0, lam],
            tmp_path / "runs",
            overrides,
            tail=0.5,
            log=lambda *a: None,
        )
    )
    base, l2e = rows
    assert base["layers"] == l2e["layers"] == [1, 2]  # mid2 of the 4-layer demo model
    # against the running statistics: fewer activations far from their neuron's mean, at every level
    for level in (5, 10, 25):
        key = f"frac_phi_gt_{level}"
        assert base[key] > 0, key
        assert l2e[key] < base[key], (key, base[key], l2e[key])
    # ... because the inhibited layers shrank relative to their own history: held-out variance (fresh on the
    # fixed set) over running variance, median over neurons, at the last evaluation
    runs = {r["lambda"]: read_run(tmp_path / "runs" / f"lambda_{r['lambda']:g}") for r in rows}
    for layer in (1, 2):
        ratio_base = runs[0.0].heldout["var_ratio_median"][layer][1][-1]
        ratio_l2e = runs[lam].heldout["var_ratio_median"][layer][1][-1]
        assert 0.7 < ratio_base < 1.4, (layer, ratio_base)
        assert ratio_l2e < 0.7 * ratio_base, (layer, ratio_base, ratio_l2e)
    # the held-out measure is logged for every layer of both runs (what a reader should compare)
    for run in runs.values():
        assert sorted(run.heldout["frac_phi_gt_5"]) == [0, 1, 2, 3]
    # at (almost) no cost in language modelling
    assert abs(l2e["valid_loss_change_pct"]) <= 2.0, (base["valid_loss"], l2e["valid_loss"])
    # the threshold keeps selecting about p of the activations in both runs
    for r in rows:
        assert 0.5 * 0.02 <= r["frac_selected"] <= 1.5 * 0.02, r
