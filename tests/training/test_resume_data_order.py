"""data-order neox: the train sample count the run's order was first built for is kept in the checkpoint, so a
run resumed with a larger train-iters that needs another epoch reads the same samples at the same steps."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from train_common import tiny_cfg

from neox_l2e.checkpoint import read_model_states, write_latest
from neox_l2e.training.loop import Trainer

# 20 documents of 40 tokens: about 49 samples of 16 + 1 tokens per epoch; 4 samples per step
N_ITERS, SAVE_AT, MORE_ITERS = 10, 5, 24  # 40 samples (one epoch); 96 samples (two epochs)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from neox_l2e.data import write_indexed_dataset

    tmp = tmp_path_factory.mktemp("order")
    g = np.random.default_rng(0)
    docs = [g.integers(0, 63, size=39).tolist() + [63] for _ in range(20)]
    return str(write_indexed_dataset(tmp / "train", docs, vocab_size=64))


def _cfg(corpus, **kw):
    return tiny_cfg(train_data_paths=[corpus], data_order="neox", lr_decay_iters=MORE_ITERS, **kw)


def _run(cfg, monkeypatch) -> dict:
    """Trains; {step: the token batch that step read}."""
    seen = {}
    orig = Trainer._batch

    def record(self, it):
        x, y = orig(self, it)
        if it is self.train_iter:
            seen[self.iteration] = x.detach().cpu().clone()
        return x, y

    monkeypatch.setattr(Trainer, "_batch", record)
    Trainer(cfg, quiet=True).train()
    monkeypatch.setattr(Trainer, "_batch", orig)
    return seen


def _resume_from(src, dst, step):
    """A save folder holding only src's checkpoint of ``step``, as latest."""
    dst.mkdir()
    shutil.copytree(src / f"global_step{step}", dst / f"global_step{step}")
    write_latest(dst, f"global_step{step}")


def test_resume_with_another_epoch_keeps_the_order(corpus, tmp_path, monkeypatch):
    a = tmp_path / "a"
    first = _run(_cfg(corpus, train_iters=N_ITERS, save=str(a), checkpoint_factor=SAVE_AT), monkeypatch)
    assert sorted(first) == list(range(N_ITERS))
    _, _, client = read_model_states(a, f"global_step{SAVE_AT}")
    assert client["first_train_samples"] == N_ITERS * 4
    b = tmp_path / "b"
    _resume_from(a, b, SAVE_AT)
    resumed = _run(_cfg(corpus, train_iters=MORE_ITERS, save=str(b), load=str(b)), monkeypatch)
    assert sorted(resumed) == list(range(SAVE_AT, MORE_ITERS))
    for step in range(SAVE_AT, N_ITERS):
        assert torch.equal(resumed[step], first[step]), step
    # carried forward: the resumed run's checkpoint keeps the first run's count
    _, _, client = read_model_states(b)
    assert client["iteration"] == MORE_ITERS and client["first_train_samples"] == N_ITERS * 4
    # the order built for the larger count alone differs (what a resume did before): the check above can fail
    fresh = _run(_cfg(corpus, train_iters=MORE_ITERS), monkeypatch)
    assert not all(torch.equal(fresh[s], first[s]) for s in range(SAVE_AT, N_ITERS))


def test_checkpoint_without_the_count_resumes_as_before_with_a_note(corpus, tmp_path, monkeypatch, capfd):
    orig = Trainer.client_state
    monkeypatch.setattr(
        Trainer, "client_state", lambda self: {k: v for k, v in orig(self).items() if k != "first_train_samples"}
    )
    a = tmp_path / "a"
    _run(_cfg(corpus, train_iters=2, save=str(a)), monkeypatch)
    monkeypatch.setattr(Trainer, "client_state", orig)
    capfd.readouterr()
    resumed = _run(_cfg(corpus, train_iters=MORE_ITERS, save=str(a), load=str(a)), monkeypatch)
    fresh = _run(_cfg(corpus, train_iters=MORE_ITERS), monkeypatch)
    assert all(torch.equal(resumed[s], fresh[s]) for s in resumed)  # the order built for this run's count
    notes = [
        line
        for line in capfd.readouterr().err.splitlines()
        if line.startswith("note:") and "train sample count" in line
    ]
    assert len(notes) == 1, notes
    _, _, client = read_model_states(a)
    assert client["first_train_samples"] == MORE_ITERS * 4
