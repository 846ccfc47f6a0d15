"""A run folder holds the resolved config (config.yml, TensorBoard text), strict-JSON metrics and NeoX's TensorBoard
tags; the config is printed once at the start."""

from __future__ import annotations

import io
import json
import math

import pytest
from train_common import datasets, inject_loss, tiny_cfg

from neox_l2e.config import load_config
from neox_l2e.training.loop import train
from neox_l2e.training.monitor import strict_json_record, tag


def _refuse(name):
    raise ValueError(f"non-strict JSON literal {name}")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = tiny_cfg(train_iters=3, log_dir=str(out), l2e_enabled=True, l2e_min_samples=8, wall_clock_breakdown=True)
    stream = io.StringIO()
    # step 2 gets a NaN loss: skipped, and its record holds non-finite values
    with inject_loss(lambda it, loss: loss + float("nan") if it == 1 else loss):
        res = train(cfg, datasets=datasets(64, 8), stream=stream)
    return cfg, res, out, stream.getvalue()


def test_config_yml_reloads_to_the_same_config(run):
    cfg, _, out, _ = run
    again = load_config(out / "config.yml")
    assert again.to_dict() == cfg.to_dict()


def test_config_printed_once_with_sources(run):
    cfg, _, out, printed = run
    assert printed.count("config (keys set by the files and overrides") == 1
    lines = printed.splitlines()
    assert any(line.split()[:2] == ["train-iters", "3"] and line.endswith("(<override>)") for line in lines)
    assert any(line.split()[:2] == ["num-layers", "2"] and "tiny.yml" in line for line in lines)
    assert str(out / "config.yml") in printed
    assert printed.index("config (") < printed.index("world size")


def test_metrics_jsonl_is_strict_json(run):
    _, res, out, _ = run
    assert res.skipped_steps == 1
    recs = [json.loads(line, parse_constant=_refuse) for line in (out / "metrics.jsonl").read_text().splitlines()]
    bad = [r for r in recs if r["kind"] == "train" and r["iteration"] == 2 and "lm_loss" in r]
    assert bad and bad[0]["lm_loss"] is None and bad[0]["nonfinite"]["lm_loss"] == "nan"
    good = [r for r in recs if r["kind"] == "train" and r["iteration"] == 3]
    assert good and math.isfinite(good[0]["lm_loss"]) and "lm_loss" not in good[0].get("nonfinite", {})


def test_tensorboard_has_neox_tags_and_the_config_text(run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, _, out, _ = run
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {
        "train/lm_loss",
        "train/learning_rate",
        "validation/lm_loss",
        "validation/lm_loss_ppl",
        "runtime/iteration_time",
        "timers/forward",
        "timers/backward",
        "timers/optimizer",
    } <= scalars
    assert "l2e_train/layer0/tau" in scalars and "train/lr" not in scalars
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "num_layers: 2" in text and "train_iters: 3" in text


def test_tag_and_strict_record_units():
    assert tag("train", "lr") == "train/learning_rate" and tag("valid", "ppl") == "validation/lm_loss_ppl"
    assert (
        tag("train", "l2e_train/layer3/tau") == "l2e_train/layer3/tau"
        and tag("train", "grad_norm") == "train/grad_norm"
    )
    assert tag("valid", "foo") == "validation/foo"
    rec = strict_json_record({"a": float("inf"), "b": -float("inf"), "c": 1.0, "d": "x"})
    assert rec == {"a": None, "b": None, "c": 1.0, "d": "x", "nonfinite": {"a": "inf", "b": "-inf"}}
