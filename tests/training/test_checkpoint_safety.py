"""Checkpoint trust and integrity: no code runs from a crafted file, the manifest catches corruption, `latest`
is never guessed, a missing RNG file or non-finite weights are errors, one job per save folder, and a resume
with a config that changes the model is refused (other changes warned about)."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed import clean_env, run_ranks

from neox_l2e.checkpoint import (
    CheckpointError,
    SaveLock,
    latest_tag,
    read_model_states,
    torch_load,
    verify_manifest,
    write_latest,
    write_weights_checkpoint,
)
from neox_l2e.checkpoint.layout import check_resume_config

REPO = Path(__file__).resolve().parents[2]


class Payload:
    """Unpickling this creates a marker file: what a crafted checkpoint would do with a shell command."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _one_line(e) -> str:
    text = str(e.value if hasattr(e, "value") else e)
    assert "\n" not in text.strip(), text
    return text


def _weights_ckpt(path, **overrides):
    from train_common import tiny_cfg

    from neox_l2e.model import GPTNeoX

    cfg = tiny_cfg(**overrides)
    write_weights_checkpoint(path, cfg, [GPTNeoX(cfg).state_dict()], tag="global_step2")
    return path, cfg


def _plant(path: Path, marker: Path, keep=None) -> None:
    """Replace a checkpoint file by a pickle whose loading would touch marker (and drop the manifest, as an
    attacker would)."""
    sd = dict(keep or {})
    sd["evil"] = Payload(marker)
    torch.save(sd, path)
    (path.parent / "manifest.json").unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------ I2: trust


def test_crafted_model_states_do_not_run_code(tmp_path):
    """read_model_states, the resume check and tools/convert_hf.py export refuse the file in one line; the
    payload never runs."""
    from neox_l2e.checkpoint import saved_meta

    ck, _ = _weights_ckpt(tmp_path / "ck")
    marker = tmp_path / "pwned"
    _plant(ck / "global_step2" / "mp_rank_00_model_states.pt", marker)
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states\.pt: refused: .*allow-list") as e:
        read_model_states(ck)
    _one_line(e)
    with pytest.raises(CheckpointError, match="refused"):
        saved_meta(ck / "global_step2")
    r = subprocess.run(
        [sys.executable, str(REPO / "tools" / "convert_hf.py"), "export", str(ck), str(tmp_path / "hf")],
        capture_output=True,
        text=True,
        env=clean_env(),
        cwd=tmp_path,
        timeout=300,
    )
    lines = [l for l in r.stderr.splitlines() if l.strip() and "[WARNING]" not in l and not l.startswith("note:")]
    assert r.returncode == 2 and len(lines) == 1 and "refused" in lines[0], r.stderr
    assert not marker.exists()


def test_train_py_load_refuses_a_crafted_checkpoint(tmp_path):
    """train.py load=DIR with a crafted mp_rank_00_model_states.pt: exit 2, one line, nothing run."""
    ck, _ = _weights_ckpt(tmp_path / "ck")
    marker = tmp_path / "pwned"
    _plant(ck / "global_step2" / "mp_rank_00_model_states.pt", marker)
    r = subprocess.run(
        [sys.executable, str(REPO / "train.py"), str(REPO / "configs/local/tiny.yml"), f"load={ck}", "train-iters=3"],
        capture_output=True,
        text=True,
        env=clean_env(NEOX_L2E_DS_SHM="0"),
        cwd=tmp_path,
        timeout=300,
    )
    lines = [l for l in r.stderr.splitlines() if l.strip() and "[WARNING]" not in l and not l.startswith("note:")]
    assert r.returncode == 2 and len(lines) == 1 and "refused" in lines[0], r.stderr
    assert not marker.exists()


def test_allow_list_loads_what_the_format_needs(tmp_path):
    import numpy as np

    from neox_l2e.checkpoint.io import rng_state

    torch.save(rng_state(), tmp_path / "rng.pt")
    state = torch_load(tmp_path / "rng.pt")
    assert isinstance(state["numpy"][1], np.ndarray) and state["numpy"][1].dtype == np.uint32
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    scaler = DynamicLossScaler(
        init_scale=2.0**8, scale_window=100, min_scale=1, delayed_shift=2, consecutive_hysteresis=False
    )
    torch.save({"scaler": scaler}, tmp_path / "opt.pt")
    assert torch_load(tmp_path / "opt.pt")["scaler"].cur_scale == 256.0


def _deepspeed_shard_worker(rank, world, save, marker):
    from train_common import datasets, tiny_cfg

    from neox_l2e.training.loop import Trainer

    Trainer(tiny_cfg(zero_optimization={"stage": 1}, train_iters=2, save=save), datasets=datasets(), quiet=True).train()
    shard = Path(save) / "global_step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    real = torch.load(shard, weights_only=False)
    _plant(shard, Path(marker), keep=real)
    try:
        Trainer(tiny_cfg(zero_optimization={"stage": 1}, train_iters=3, load=save), datasets=datasets(), quiet=True)
    except CheckpointError as e:
        return str(e)
    return None


def test_deepspeed_load_goes_through_the_safe_loader(tmp_path):
    """DeepSpeed's engine.load_checkpoint torch.loads the ZeRO shards itself (weights_only=False): a crafted
    shard (valid model states, no manifest) is refused in one line through the engine's checkpoint engine."""
    marker = tmp_path / "pwned"
    err = run_ranks(_deepspeed_shard_worker, world=1, args=(str(tmp_path / "ck"), str(marker)))[0]
    assert err and "zero_pp_rank_0_mp_rank_00_optim_states.pt: refused" in err and "\n" not in err, err
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ I4: corruption


def test_manifest_catches_flipped_bytes_and_can_be_skipped(tmp_path, capsys):
    ck, _ = _weights_ckpt(tmp_path / "ck")
    folder = ck / "global_step2"
    assert verify_manifest(folder) == ["mp_rank_00_model_states.pt"]
    path = folder / "mp_rank_00_model_states.pt"
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states\.pt: corrupted: sha256 differs") as e:
        read_model_states(ck)
    _one_line(e)
    # the Trainer's check before anything is built (finetune here), and checkpoint-verify: false skipping it
    from types import SimpleNamespace

    from train_common import tiny_cfg

    from neox_l2e.checkpoint import check_resume

    ps = SimpleNamespace(tp=1, dp=1, tp_rank=0, rank=0, world_size=1, is_main=True)
    with pytest.raises(CheckpointError, match="corrupted"):
        check_resume(tiny_cfg(load=str(ck), finetune=True), ck, "global_step2", ps)
    capsys.readouterr()
    check_resume(tiny_cfg(load=str(ck), finetune=True, checkpoint_verify=False), ck, "global_step2", ps)
    assert "checkpoint-verify is off: not checking size and sha256 of 1 file(s)" in capsys.readouterr().err
    path.write_bytes(bytes(data[:-10]))
    with pytest.raises(CheckpointError, match=r"corrupted: \d+ bytes, the manifest says \d+"):
        read_model_states(ck)
    capsys.readouterr()
    assert verify_manifest(folder, verify=False, log=print) == []
    assert "checkpoint-verify is off: not checking size and sha256 of 1 file(s)" in capsys.readouterr().out


def test_checkpoint_without_manifest_still_loads_with_a_note(tmp_path, capsys):
    ck, cfg = _weights_ckpt(tmp_path / "ck")
    (ck / "global_step2" / "manifest.json").unlink()
    cfg_dict, states, _ = read_model_states(ck)
    assert cfg_dict == cfg.to_dict() and len(states) == 1
    assert "has no manifest.json (written by an older version)" in capsys.readouterr().err


def test_latest_is_never_guessed(tmp_path):
    """A missing, empty or garbage `latest` next to global_step folders is one line naming the folders (it
    started from scratch and repointed `latest`); an empty folder has no checkpoint."""
    assert latest_tag(tmp_path) is None
    _weights_ckpt(tmp_path)
    (tmp_path / "global_step5").mkdir()
    for content in (None, "", "  \n", "garbage", "global_step9", "\x00\x01"):
        if content is None:
            (tmp_path / "latest").unlink()
        else:
            (tmp_path / "latest").write_text(content)
        with pytest.raises(CheckpointError, match=r"latest: .*holds global_step2, global_step5; write the tag") as e:
            latest_tag(tmp_path)
        _one_line(e)
    write_latest(tmp_path, "global_step2")
    assert latest_tag(tmp_path) == "global_step2"


def _resume_worker(rank, world, save, case):
    from train_common import datasets, tiny_cfg

    from neox_l2e.training.loop import Trainer

    if case == "nonfinite":
        tr = Trainer(tiny_cfg(train_iters=2, save=save), datasets=datasets(), quiet=True)
        tr.train()
        with torch.no_grad():
            next(tr.module.parameters())[0].fill_(float("nan"))
        tr.iteration += 1
        try:
            tr.save()
        except CheckpointError as e:
            return {"error": str(e), "latest": latest_tag(save)}
        return {"error": None}
    Trainer(
        tiny_cfg(train_iters=2, save=save, l2e_enabled=True, l2e_min_samples=8), datasets=datasets(), quiet=True
    ).train()
    out = {}
    folder = Path(save) / "global_step2"
    rng = folder / "rng_state_rank00000.pt"
    for name, mutate, overrides in [
        ("rng", lambda: (rng.unlink(), (folder / "manifest.json").unlink()), {}),
        ("model", None, {"rotary_pct": 0.5, "l2e_layers": [0]}),
        ("warn", None, {"l2e_ratio": 0.05, "seq_length": 8, "train_micro_batch_size_per_gpu": 2}),
    ]:
        if mutate:
            backup = Path(save + "-backup")
            shutil.copytree(save, backup)
            mutate()
        try:
            tr = Trainer(
                tiny_cfg(train_iters=3, load=save, l2e_enabled=True, l2e_min_samples=8, **overrides),
                datasets=datasets(),
                quiet=True,
            )
            out[name] = {"error": None, "iteration": tr.iteration}
        except CheckpointError as e:
            out[name] = {"error": str(e)}
        if mutate:
            shutil.rmtree(save)
            shutil.move(str(backup), save)
    return out


def test_nonfinite_weights_are_never_saved(tmp_path):
    out = run_ranks(_resume_worker, world=1, args=(str(tmp_path / "ck"), "nonfinite"))[0]
    assert out["error"] and "step 3: the weights hold NaN/inf" in out["error"] and "\n" not in out["error"]
    assert out["latest"] == "global_step2" and not (tmp_path / "ck" / "global_step3").exists()


def test_resume_checks_rng_file_and_config(tmp_path, capfd):
    """A missing RNG file is an error (it was ignored); a config that changes the model (rotary-pct, the L2E
    layers) is one line naming the keys (it passed silently or raised a load_state_dict traceback); an L2E /
    data / batch change resumes with one warning line naming each key."""
    out = run_ranks(_resume_worker, world=1, args=(str(tmp_path / "ck"), "resume"))[0]
    assert out["rng"]["error"] and "rng_state_rank00000.pt: missing" in out["rng"]["error"], out
    err = out["model"]["error"]
    assert err and "changes the model" in err and "rotary-pct 0.25 -> 0.5" in err and "L2E layers" in err, err
    assert "finetune: true" in err and "\n" not in err
    assert out["warn"] == {"error": None, "iteration": 2}, out
    warn = [l for l in capfd.readouterr().err.splitlines() if l.startswith("warning: resuming")]
    assert len(warn) == 1 and all(
        k in warn[0] for k in ("l2e-ratio 0.02 -> 0.05", "seq-length 16 -> 8", "train-micro-batch-size-per-gpu")
    ), warn


def test_config_change_rules():
    from train_common import tiny_cfg

    base = tiny_cfg(l2e_enabled=True).to_dict()
    for key, value, name in [
        ("hidden_size", 64, "hidden-size"),
        ("num_layers", 3, "num-layers 2 -> 3"),
        ("bias_gelu_fusion", False, "bias-gelu-fusion"),
        ("l2e_method", "memel", "l2e-method"),
        ("l2e_enabled", False, "L2E layers"),
    ]:
        with pytest.raises(CheckpointError, match=name):
            check_resume_config("ck", base, dict(base, **{key: value}))
    assert check_resume_config("ck", base, dict(base, train_iters=99, save="x", log_interval=1)) == []
    # the same layers spelt differently is no change
    layers = tiny_cfg(l2e_enabled=True).inhibited_layers()
    assert check_resume_config("ck", base, dict(base, l2e_layers=layers)) == []


def test_final_nonfinite_run_is_an_error():
    from neox_l2e.training.faults import nonfinite_end
    from neox_l2e.training.loop import TrainResult

    assert nonfinite_end(TrainResult(train_losses=[(1, 2.0)], valid_losses=[(1, 2.1)])) is None
    assert "last step (2) had a NaN/inf loss" in nonfinite_end(TrainResult(train_losses=[(1, 2.0), (2, float("nan"))]))
    assert "final validation loss at step 2 is nan" in nonfinite_end(
        TrainResult(train_losses=[(2, 2.0)], valid_losses=[(2, float("nan"))])
    )
    assert nonfinite_end(TrainResult(train_losses=[(2, float("nan"))], interrupted=True)) is None


# ------------------------------------------------------------------------------------------------ I3: lock


def test_save_folder_lock(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".lock").write_text(
            f'{{"host": "{socket.gethostname()}", "pid": {other.pid}, "started": "2026-01-01 00:00:00"}}'
        )
        with pytest.raises(CheckpointError, match=rf"another job \(host .*, pid {other.pid}, .*delete .*\.lock") as e:
            SaveLock.acquire(tmp_path)
        _one_line(e)
    finally:
        other.kill()
        other.wait()
    lock = SaveLock.acquire(tmp_path)  # the pid is dead now: a stale lock is taken over
    assert f'"pid": {os.getpid()}' in (tmp_path / ".lock").read_text()
    lock.release()
    assert not (tmp_path / ".lock").exists()
    (tmp_path / ".lock").write_text('{"host": "some-other-node", "pid": 1, "started": "x"}')
    with pytest.raises(CheckpointError, match="host some-other-node"):
        SaveLock.acquire(tmp_path)  # another host's lock cannot be checked: refused


def _locked_worker(rank, world, save, pid):
    from train_common import datasets, tiny_cfg

    from neox_l2e.training.loop import Trainer

    (Path(save) / ".lock").write_text(f'{{"host": "{socket.gethostname()}", "pid": {pid}, "started": "now"}}')
    try:
        Trainer(tiny_cfg(train_iters=1, save=save), datasets=datasets(), quiet=True)
    except CheckpointError as e:
        return str(e)
    return None


def test_second_job_on_a_save_folder_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    err = run_ranks(_locked_worker, world=1, args=(str(tmp_path / "run"), os.getpid()))[0]
    assert err and "another job" in err and "\n" not in err, err


def test_train_tokenizer_keeps_an_existing_model(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "tools"))
    import train_tokenizer

    (tmp_path / "tok.model").write_bytes(b"precious")
    (tmp_path / "in.txt").write_text("hello world\n" * 10)
    code = train_tokenizer.main(
        ["--input", str(tmp_path / "in.txt"), "--model-prefix", str(tmp_path / "tok"), "--vocab-size", "40"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "tok.model: output exists; pass --overwrite" in err and err.strip().count("\n") == 0
    assert (tmp_path / "tok.model").read_bytes() == b"precious"


# ------------------------------------------------------------------------------------------------ J4: structure


def test_parallel_is_a_leaf_and_errors_share_one_base():
    import ast

    for path in (REPO / "neox_l2e" / "parallel").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 2:
                assert (node.module or "").split(".")[0] in ("errors",), f"{path.name} imports ..{node.module}"
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("neox_l2e."):
                assert node.module == "neox_l2e.errors", f"{path.name} imports {node.module}"
    from neox_l2e.analysis.common import AnalysisError
    from neox_l2e.checkpoint import ReshardError
    from neox_l2e.config import ConfigError
    from neox_l2e.data import DataError
    from neox_l2e.errors import NeoXL2EError
    from neox_l2e.interop.hf import InteropError
    from neox_l2e.parallel import LaunchError
    from neox_l2e.training import CheckpointError as CE
    from neox_l2e.training import TrainingError

    for cls in (AnalysisError, ReshardError, ConfigError, DataError, InteropError, LaunchError, CE, TrainingError):
        assert issubclass(cls, NeoXL2EError), cls
    assert not issubclass(LaunchError, ConfigError) and issubclass(ReshardError, CE)


def test_nonfinite_check_allows_an_uninitialised_l2e_threshold():
    from train_common import tiny_cfg

    from neox_l2e.checkpoint import nonfinite_tensors
    from neox_l2e.model import GPTNeoX

    model = GPTNeoX(tiny_cfg(l2e_enabled=True))
    taus = [k for k, v in model.named_buffers() if k.endswith(".tau")]
    assert taus and all(torch.isinf(dict(model.named_buffers())[k]) for k in taus)  # +inf until initialised
    assert nonfinite_tensors(model) == []
    with torch.no_grad():
        dict(model.named_buffers())[taus[0]].fill_(float("nan"))
        model.gpt_neox.embed_in.weight[0, 0] = float("inf")
    assert nonfinite_tensors(model) == ["gpt_neox.embed_in.weight", taus[0]]
