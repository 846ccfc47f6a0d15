"""Config keys whose doc promises an effect on the run: wandb-host reaches wandb, zero-allow-untested-optimizer
reaches DeepSpeed."""

import io
import os
import sys
import types

from train_common import tiny_cfg


def test_wandb_host_is_exported_before_wandb_init(monkeypatch, tmp_path):
    from neox_l2e.training.monitor import Monitor

    seen = {}

    def init(**kw):
        seen["base_url"] = os.environ.get("WANDB_BASE_URL")
        seen["project"] = kw.get("project")
        return types.SimpleNamespace(log=lambda *a, **k: None, finish=lambda *a, **k: None)

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.setenv("WANDB_BASE_URL", "https://from-the-environment.example")  # restored afterwards
    cfg = tiny_cfg(use_wandb=True, wandb_host="https://wandb.example.com", wandb_project="p")
    Monitor(cfg, str(tmp_path), stream=io.StringIO()).close()
    assert seen == {"base_url": "https://wandb.example.com", "project": "p"}
    # unset: the environment's value (or wandb's default) stays
    monkeypatch.setenv("WANDB_BASE_URL", "https://from-the-environment.example")
    Monitor(tiny_cfg(use_wandb=True), str(tmp_path), stream=io.StringIO()).close()
    assert seen["base_url"] == "https://from-the-environment.example"


def test_zero_allow_untested_optimizer_is_passed_to_deepspeed():
    from neox_l2e.training.engine import deepspeed_config

    assert deepspeed_config(tiny_cfg(), 1)["zero_allow_untested_optimizer"] is True
    assert deepspeed_config(tiny_cfg(zero_allow_untested_optimizer=False), 1)["zero_allow_untested_optimizer"] is False
