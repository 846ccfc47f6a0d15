"""A checkpoint save that cannot write (disk full, no permission) is one CheckpointError line; the previous
checkpoint stays `latest` and the partial save is removed."""

import errno
import os
import shutil
from pathlib import Path

import pytest
from distributed import run_ranks

from neox_l2e.checkpoint import CheckpointError, SaveLock


def _save_fails_worker(rank, world, save, case):
    from train_common import datasets, tiny_cfg

    from neox_l2e.training.loop import Trainer

    tr = Trainer(tiny_cfg(train_iters=2, save=save), datasets=datasets(), quiet=True)
    tr.train()
    real_save = tr.engine.checkpoint_engine.save

    def full_disk(state_dict, path):
        Path(path).write_bytes(b"partial")  # what a write cut short leaves behind
        if case == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    tr.engine.checkpoint_engine.save = full_disk
    if case == "torch":  # torch.save's own error on a full disk does not say why: the free space does
        shutil.disk_usage = lambda path: shutil._ntuple_diskusage(1 << 40, (1 << 40) - (1 << 20), 1 << 20)
    tr.iteration += 1
    try:
        tr.save()
    except CheckpointError as e:
        error = str(e)
    else:
        error = None
    finally:
        tr.engine.checkpoint_engine.save = real_save
    return {"error": error, "latest": (Path(save) / "latest").read_text(), "left": sorted(os.listdir(save))}


@pytest.mark.parametrize("case,reason", [("enospc", "disk full"), ("torch", "disk full: 1 MiB left")])
def test_disk_full_during_a_save_is_one_line(tmp_path, case, reason):
    save = tmp_path / "ck"
    out = run_ranks(_save_fails_worker, world=1, args=(str(save), case))[0]
    assert out["error"] == (
        f"{save / 'global_step3'}: cannot save the checkpoint ({reason}); the previous checkpoint stays latest: "
        "global_step2"
    ), out
    assert out["latest"] == "global_step2" and "global_step3" not in out["left"]
    assert [n for n in out["left"] if "global_step3" in n] == [], out["left"]  # the partial save is gone


def test_an_error_that_is_not_a_failed_write_is_not_hidden(tmp_path):
    from neox_l2e.checkpoint.io import _write_failure

    assert _write_failure(RuntimeError("CUDA error: an illegal memory access"), tmp_path) is None
    assert _write_failure(OSError(errno.EACCES, "Permission denied"), tmp_path) == "Permission denied"


def test_unwritable_save_folder_is_one_line(tmp_path, monkeypatch):
    """A save folder where the lock file cannot be created (chmod does not stop root: the open is made to fail),
    or that cannot be created, is refused before training in one line."""
    real_open = os.open

    def deny(path, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", deny)
    with pytest.raises(CheckpointError) as e:
        SaveLock.acquire(tmp_path / "run")
    assert str(e.value) == (
        f"{tmp_path / 'run' / '.lock'}: cannot create the lock file (Permission denied); make the save folder "
        "writable or choose another one"
    )
    monkeypatch.undo()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(CheckpointError, match=r"afile/run: cannot create the save folder \(.*\); choose another"):
        SaveLock.acquire(tmp_path / "afile" / "run")
