"""Shared pieces of the training tests: the tiny config and a small learnable synthetic dataset."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "local" / "tiny.yml"
VOCAB = 64
SEQ = 16

# no JIT build of DeepSpeed's CPU shared-memory op in tests (gloo does the all-reduces)
os.environ.setdefault("NEOX_L2E_DS_SHM", "0")


class SyntheticTokens(torch.utils.data.Dataset):
    """Learnable sequences: token[t] = (a + b * t) mod vocab, a and b drawn per sample from a seed."""

    def __init__(self, n: int, seed: int, seq: int = SEQ, vocab: int = VOCAB):
        g = np.random.default_rng(seed)
        a = g.integers(0, vocab, size=n)
        b = g.integers(1, 4, size=n)
        t = np.arange(seq + 1)
        self.rows = (a[:, None] + b[:, None] * t[None, :]) % vocab

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"text": self.rows[i].astype(np.int64)}


def datasets(n_train: int = 512, n_valid: int = 32) -> dict:
    return {"train": SyntheticTokens(n_train, 0), "valid": SyntheticTokens(n_valid, 1)}


def tiny_cfg(**overrides):
    from neox_l2e.config import load_config

    return load_config([TINY], overrides)


def full_state(trainer) -> dict:
    """The whole model state (ZeRO-3 gathered) as CPU tensors; every rank calls it, rank 0 gets the dict."""
    engine = trainer.engine
    if engine.zero_optimization_partition_weights():
        sd = engine._zero3_consolidated_16bit_state_dict()
        return {k: v.clone() for k, v in sd.items()} if sd is not None else None
    return {k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()}


# ------------------------------------------------------------------------------------------------
# fault injection (tests only: production code has no fault hooks)


def _wrap_total_loss(fn):
    """Makes every micro-batch loss of every Trainer ``fn(iteration, loss)``; returns the original method."""
    from neox_l2e.training.loop import Trainer

    orig = Trainer._total_loss

    def patched(self, lm, l2e_loss):
        return fn(self.iteration, orig(self, lm, l2e_loss))

    Trainer._total_loss = patched
    return orig


@contextlib.contextmanager
def inject_loss(fn):
    """Every micro-batch loss of every Trainer becomes ``fn(iteration, loss)`` inside the block (iteration: the
    steps taken before this one), by wrapping Trainer._total_loss."""
    from neox_l2e.training.loop import Trainer

    orig = _wrap_total_loss(fn)
    try:
        yield
    finally:
        Trainer._total_loss = orig


def kill_in_save(iteration: int) -> None:
    """SIGKILL this process inside the save of ``iteration``: after the files are written and hashed, before the
    manifest, the rename of the folder and ``latest`` (wraps neox_l2e.checkpoint.io.write_manifest)."""
    from neox_l2e.checkpoint import io as ckpt_io
    from neox_l2e.checkpoint.files import TMP_PREFIX, tag_for

    orig = ckpt_io.write_manifest

    def patched(folder, entries, *a, **k):
        if Path(folder).name == TMP_PREFIX + tag_for(iteration):
            os.kill(os.getpid(), signal.SIGKILL)
        return orig(folder, entries, *a, **k)

    ckpt_io.write_manifest = patched


def install_faults_from_env(rank: int) -> None:
    """For tests that start processes: TEST_NAN_STEPS="3,4" (or "3,4@1": rank 1 only) makes the loss NaN at those
    steps (0-based: steps taken before); TEST_KILL_IN_SAVE=N SIGKILLs the process inside the save of step N;
    DIE_AT=<iteration>@<rank> makes that rank exit abruptly inside that step. Installed for the process's life."""
    nan = os.environ.get("TEST_NAN_STEPS", "").strip()
    spec, _, who = nan.partition("@")
    nan_steps = {int(x) for x in spec.split(",") if x.strip()} if (not who or int(who) == rank) else set()
    die = os.environ.get("DIE_AT")
    die_at = tuple(int(x) for x in die.split("@")) if die else None

    def fault(it, loss):
        if die_at is not None and it == die_at[0] and rank == die_at[1]:
            os._exit(17)
        return loss + float("nan") if it in nan_steps else loss

    if nan_steps or die_at is not None:
        _wrap_total_loss(fault)
    if os.environ.get("TEST_KILL_IN_SAVE"):
        kill_in_save(int(os.environ["TEST_KILL_IN_SAVE"]))
