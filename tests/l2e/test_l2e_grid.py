"""tools/l2e_grid.py end to end on the tiny config: a reduced grid, 2 seeds, a few steps; resumable; one report."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import l2e_grid  # noqa: E402


def test_grid_entries_are_the_papers_grid():
    names = list(l2e_grid.grid_entries())
    assert names[0] == "baseline" and len(names) == 1 + 9 + 3
    assert {"l2e-1pct-mid2", "l2e-2pct-mid-third", "l2e-3pct-top-bot", "memel-3pct-mid2"} <= set(names)
    assert l2e_grid.grid_entries()["l2e-3pct-top-bot"] == {
        "l2e_enabled": True,
        "l2e_method": "l2e",
        "l2e_layers": "top-bot",
        "l2e_ratio": 0.03,
    }
    assert list(l2e_grid.select_entries("full", "baseline,l2e-*-mid2")) == [
        "baseline",
        "l2e-1pct-mid2",
        "l2e-2pct-mid2",
        "l2e-3pct-mid2",
    ]
    assert list(l2e_grid.select_entries("small", None)) == list(l2e_grid.SMALL)
    with pytest.raises(l2e_grid.GridError, match="--only 'l2e-9pct' matches no grid entry"):
        l2e_grid.select_entries("full", "l2e-9pct")


def test_reduced_grid_two_seeds_end_to_end_and_resume(tmp_path, capsys):
    from neox_l2e.data import write_indexed_dataset

    g = np.random.default_rng(0)
    docs = [list(g.integers(1, 64, size=int(g.integers(20, 60)))) for _ in range(120)]
    train = write_indexed_dataset(str(tmp_path / "train"), docs[:100], vocab_size=64)
    valid = write_indexed_dataset(str(tmp_path / "valid"), docs[100:], vocab_size=64)
    out = tmp_path / "grid"
    argv = [
        "--config",
        str(ROOT / "configs/local/tiny.yml"),
        "--no-corpus",
        "--seeds",
        "1,2",
        "--only",
        "baseline,l2e-2pct-mid2",
        "--out",
        str(out),
        f'train-data-paths=["{train}"]',
        f'valid-data-paths=["{valid}"]',
        "train-iters=4",
        "eval-interval=2",
        "log-interval=1",
        "ms-heldout-tokens=256",
        "l2e-min-samples=8",
    ]
    assert l2e_grid.main(argv) == 0
    text = capsys.readouterr().out
    assert "2 entries x 2 seeds = 4 runs; 0 finished already (skipped), 4 to run" in text
    assert "[4/4] l2e-2pct-mid2 seed 2 ... (elapsed" in text and "ETA" in text
    for name in ("baseline", "l2e-2pct-mid2"):
        for seed in (1, 2):
            assert (out / name / f"seed{seed}" / "done.json").is_file()
    report = json.loads((out / "report.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == ["baseline", "l2e-2pct-mid2"] and not report["missing"]
    for r in rows.values():
        assert r["seeds"] == [1, 2] and r["valid_loss"][2] == 2 and r["valid_loss"][1] is not None  # mean, sd, n
        assert r["inh_frac_phi_gt_5"][2] == 2
    assert rows["l2e-2pct-mid2"]["valid_change_pct"][2] == 2 and rows["l2e-2pct-mid2"]["overhead_pct"][2] == 2
    assert rows["l2e-2pct-mid2"]["inh_var_ratio_median"][2] == 2  # inhibited layers have running stats
    assert rows["baseline"]["inh_var_ratio_median"][2] == 0
    md = (out / "report.md").read_text()
    assert "| l2e-2pct-mid2 | 0,1 | 2 |" in md and "| baseline | (0,1) | 2 |" in md
    assert "machine:" in md and "command:" in md
    for fig in ("phi_distribution.png", "heldout_over_training.png"):
        assert (out / fig).stat().st_size > 1000
    # resumable: everything finished is skipped, the report is rebuilt
    assert l2e_grid.main(argv) == 0
    assert "4 finished already (skipped), 0 to run" in capsys.readouterr().out
