"""Every shipped config trains: 2 CPU steps from each configs/pythia/*.yml and each published Pythia yml (each with
one grid file), and from each configs/l2e/*.yml on the demo config, all in this one process.

The model is shrunk by overrides (layers, width, heads, sequence, batch, fp32) and fed the synthetic tokens of
train_common; everything else comes from the files as a user runs them: ZeRO 1 and activation checkpointing of the
Pythia configs, their ``wall_clock_breakdown: true`` (DeepSpeed's per-phase timers), the L2E keys of the grid.
The published ymls are read from ``<repo>/../shared/data/pythia-configs`` (or $NEOX_L2E_PYTHIA_CONFIGS) when that
folder exists; the two files published with errors must be refused with their one-line message.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from train_common import REPO, datasets

from neox_l2e.config import ConfigError, load_config
from neox_l2e.training.loop import train

PYTHIA = sorted((REPO / "configs" / "pythia").glob("*.yml"))
GRIDS = sorted((REPO / "configs" / "l2e").glob("*.yml"))
DEMO = REPO / "configs" / "local" / "demo.yml"
PUBLISHED_DIR = Path(os.environ.get("NEOX_L2E_PYTHIA_CONFIGS", REPO.parent / "shared" / "data" / "pythia-configs"))
PUBLISHED = sorted(PUBLISHED_DIR.glob("pythia-*.yml")) if PUBLISHED_DIR.is_dir() else []
REFUSED = {  # published with errors: the one line each must give
    "pythia-12b.yml": r"pythia-12b\.yml:21:\d+: YAML syntax error: .* \(a missing comma after line 19\?\)$",
    "pythia-12b-deduped.yml": r"pythia-12b-deduped\.yml: num-layers 40 and num-attention-heads 36 look swapped: .*"
    r"exchange the two values$",
}

# a tiny model on one process: 2 layers x 32 wide, seq 16, vocab 64 (train_common's synthetic tokens), micro-batch 2,
# fp32, TP 1
TINY = {
    "num_layers": 2,
    "hidden_size": 32,
    "num_attention_heads": 4,
    "seq_length": 16,
    "max_position_embeddings": 16,
    "vocab_size": 64,
    "make_vocab_size_divisible_by": 8,
    "attention_config": [[["flash"], 2]],
    "train_micro_batch_size_per_gpu": 2,
    "gas": 1,
    "precision": "fp32",
    "train_iters": 2,
    "eval_iters": 1,
    "model_parallel_size": 1,
    "save": None,
    "load": None,
    "progress_bar": False,
    "l2e_min_samples": 8,
}


def _pairs():
    """(model config, grid file): every Pythia config with one grid file (cycled), every grid file on demo.yml."""
    out = [(p, GRIDS[i % len(GRIDS)]) for i, p in enumerate(PYTHIA + PUBLISHED)]
    out += [(DEMO, g) for g in GRIDS]
    return out


def _id(pair):
    base, grid = pair
    where = "published" if base.parent == PUBLISHED_DIR else base.parent.name
    return f"{where}/{base.stem}+{grid.stem}"


@pytest.fixture(scope="module")
def data():
    return datasets(n_train=16, n_valid=4)


@pytest.mark.parametrize("pair", _pairs(), ids=_id)
def test_two_steps(pair, data, tmp_path, capsys):
    base, grid = pair
    overrides = dict(TINY, log_dir=str(tmp_path), wall_clock_breakdown=True)
    if base.name in REFUSED and base.parent == PUBLISHED_DIR:
        with pytest.raises(ConfigError, match=REFUSED[base.name]) as err:
            load_config([base, grid])  # as published: the tiny overrides would replace the wrong values
        assert "\n" not in str(err.value)
        return
    cfg = load_config([base, grid], overrides)
    assert cfg.logging.wall_clock_breakdown
    grid_cfg = load_config([REPO / "configs" / "local" / "tiny.yml", grid], {"l2e_min_samples": 8})
    assert cfg.l2e == grid_cfg.l2e  # the grid's experiment, whatever the base config
    res = train(cfg, datasets=data)
    assert res.iteration == 2 and all(math.isfinite(loss) for _, loss in res.train_losses)
    assert len(res.valid_losses) == 1 and math.isfinite(res.valid_losses[0][1])
    assert bool(res.l2e_metrics) == cfg.l2e_active
    # DeepSpeed's wall-clock breakdown ran: its timings are printed and logged with the train metrics
    printed = capsys.readouterr().out.splitlines()
    assert (
        sum("fwd_microstep" in line and "bwd_microstep" in line and "step_microstep" in line for line in printed) == 2
    )
    train_recs = [
        json.loads(line)
        for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["kind"] == "train"
    ]
    assert train_recs and all(
        r["timers/forward"] > 0 and r["timers/backward"] > 0 and r["timers/optimizer"] > 0 for r in train_recs
    )


def test_published_configs_are_covered():
    """Not a silent skip when the published ymls are there: all 18 of them are in the table above."""
    if not PUBLISHED_DIR.is_dir():
        pytest.skip(f"{PUBLISHED_DIR} is absent")
    assert len(PUBLISHED) == 18 and set(REFUSED) <= {p.name for p in PUBLISHED}
