"""Shared pieces of the training tests: the tiny config and a small learnable synthetic dataset."""
from __future__ import annotations

import os
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
