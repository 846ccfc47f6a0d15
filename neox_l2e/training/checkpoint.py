"""Checkpoints: DeepSpeed checkpoint folders, saved atomically, plus readers for other tools.

Layout (docs/checkpoints.md is the contract):

    save_dir/
      latest                                  the newest complete tag; written last (temp file + os.replace)
      global_step{N}/
        mp_rank_{tp:02d}_model_states.pt      DeepSpeed's file: "module" (full model state_dict of this TP
                                              rank, L2E buffers included) + our client state
        zero_pp_rank_{dp}_mp_rank_00_model_states.pt   ZeRO-3 only: DeepSpeed's per-rank files (partitioned
                                              "module"); mp_rank_00_model_states.pt is then written by us
                                              with the consolidated weights
        zero_pp_rank_{dp}_mp_rank_{tp:02d}_optim_states.pt   ZeRO optimizer shards (ZeRO >= 1)
        rng_state_rank{R:05d}.pt              python / numpy / torch (/ cuda) RNG of global rank R

A save writes into ``save_dir/.tmp-global_step{N}``; when every rank has finished, rank 0 renames the
folder to ``global_step{N}`` and only then moves ``latest``. A save killed at any point leaves the
previous checkpoint, and ``latest``, untouched.

Readers (no DeepSpeed, no process group): ``latest_tag``, ``list_tags``, ``read_model_states``;
writer for importers: ``write_weights_checkpoint`` (a weights-only checkpoint that train.py loads
with ``finetune: true``).
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..l2e.keys import is_l2e_state_key

FORMAT_VERSION = 1
TMP_PREFIX = ".tmp-"
TAG_RE = re.compile(r"^global_step(\d+)$")
# test hook: SIGKILL this process inside the save of the given iteration (after the files are written,
# before the folder is renamed and `latest` moves)
KILL_IN_SAVE_ENV = "NEOX_L2E_TEST_KILL_IN_SAVE"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or written: one line naming the path and the problem."""


def tag_for(iteration: int) -> str:
    return f"global_step{int(iteration)}"


def step_of(tag: str) -> Optional[int]:
    m = TAG_RE.match(tag)
    return int(m.group(1)) if m else None


def model_states_name(tp_rank: int) -> str:
    return f"mp_rank_{tp_rank:02d}_model_states.pt"


# ----------------------------------------------------------------------------------------------
# readers


def latest_tag(save_dir) -> Optional[str]:
    """The tag named by save_dir/latest, or None when there is no (complete) checkpoint."""
    p = Path(save_dir) / "latest"
    if not p.is_file():
        return None
    tag = p.read_text().strip()
    return tag or None


def list_tags(save_dir) -> list:
    """Complete checkpoint tags (global_stepN folders with model states) in step order."""
    d = Path(save_dir)
    if not d.is_dir():
        return []
    tags = [p.name for p in d.iterdir()
            if p.is_dir() and step_of(p.name) is not None and (p / model_states_name(0)).is_file()]
    return sorted(tags, key=step_of)


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read ({str(e).splitlines()[0][:200]})") from None


def read_model_states(save_dir, tag: Optional[str] = None) -> tuple:
    """(cfg_dict, [state_dict per TP rank], client_state of TP rank 0) of a checkpoint (default: latest).

    cfg_dict is the resolved config saved with the run (``cfg.to_dict()``); rebuild it with
    ``neox_l2e.config.config_from_checkpoint_dict``. The state dicts are on CPU in the dtype the
    model had (fp16/bf16 runs: half precision weights).
    """
    d = Path(save_dir)
    tag = tag or latest_tag(d)
    if tag is None:
        raise CheckpointError(f"{d}: no checkpoint (no 'latest' file); pass a tag or a folder with a checkpoint")
    folder = d / tag
    if not (folder / model_states_name(0)).is_file():
        raise CheckpointError(f"{folder}: no {model_states_name(0)}; not a complete checkpoint")
    states, client = [], None
    rank = 0
    while (folder / model_states_name(rank)).is_file():
        sd = _torch_load(folder / model_states_name(rank))
        if "module" not in sd:
            raise CheckpointError(f"{folder / model_states_name(rank)}: no 'module' entry")
        states.append(sd["module"])
        if rank == 0:
            client = {k: v for k, v in sd.items() if k != "module"}
        rank += 1
    cfg_dict = client.get("neox_config")
    if cfg_dict is None:
        raise CheckpointError(f"{folder / model_states_name(0)}: no 'neox_config' entry (not a neox-l2e checkpoint)")
    return cfg_dict, states, client


def write_latest(save_dir, tag: str) -> None:
    """Point save_dir/latest at tag atomically (temp file, fsync, os.replace)."""
    d = Path(save_dir)
    tmp = d / f".latest.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, d / "latest")


def write_weights_checkpoint(save_dir, cfg, state_dicts_per_tp_rank: Sequence[dict], tag: str = "global_step0",
                             client_state: Optional[dict] = None) -> Path:
    """A weights-only checkpoint (no optimizer) in the same layout; train.py starts from it with finetune: true.

    ``state_dicts_per_tp_rank[r]`` is the model state_dict of TP rank r (one entry for TP 1).
    """
    d = Path(save_dir)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / (TMP_PREFIX + tag)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    base = {"neox_config": cfg.to_dict(), "iteration": step_of(tag) or 0, "consumed_train_samples": 0,
            "neox_l2e_format": FORMAT_VERSION, "weights_only": True, "tp": len(state_dicts_per_tp_rank),
            "dp_world_size": 1, "mp_world_size": len(state_dicts_per_tp_rank)}
    base.update(client_state or {})
    for r, sd in enumerate(state_dicts_per_tp_rank):
        entry = dict(base)
        entry["module"] = {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in sd.items()}
        torch.save(entry, tmp / model_states_name(r))
    _commit_folder(d, tmp, tag)
    write_latest(d, tag)
    return d / tag


# ----------------------------------------------------------------------------------------------
# RNG


def rng_state(ps=None) -> dict:
    """Every RNG of this rank: python, numpy, torch (CPU, CUDA) and the model's dropout streams (ps.rng)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    tracker = getattr(ps, "rng", None)
    if tracker is not None:
        state["tracker"] = tracker.get_states()
    return state


def set_rng_state(state: dict, ps=None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tracker = getattr(ps, "rng", None)
    if tracker is not None and "tracker" in state:
        tracker.set_states(state["tracker"])
        torch.set_rng_state(state["torch"])


# ----------------------------------------------------------------------------------------------
# saving / loading with a DeepSpeed engine


def _commit_folder(save_dir: Path, tmp: Path, tag: str) -> None:
    final = save_dir / tag
    if final.exists():            # a stale folder of that name (not `latest`, see save_checkpoint)
        trash = save_dir / f"{TMP_PREFIX}old-{tag}-{os.getpid()}"
        os.replace(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(tmp, final)


def save_checkpoint(engine, save_dir, iteration: int, client_state: dict, ps, keep_last_n: Optional[int] = None) -> Optional[str]:
    """Save a complete, resumable checkpoint of `engine` as global_step{iteration}; every rank calls this.

    Returns the tag, or None when that tag is already the latest checkpoint (nothing to do).
    """
    d = Path(save_dir)
    tag = tag_for(iteration)
    if latest_tag(d) == tag and (d / tag / model_states_name(0)).is_file():
        return None
    tmp_tag = TMP_PREFIX + tag
    if ps.is_main:
        d.mkdir(parents=True, exist_ok=True)
        if (d / tmp_tag).exists():
            shutil.rmtree(d / tmp_tag)
    ps.barrier()
    state = dict(client_state)
    state.setdefault("neox_l2e_format", FORMAT_VERSION)
    engine.save_checkpoint(str(d), tag=tmp_tag, client_state=state, save_latest=False)
    torch.save(rng_state(ps), d / tmp_tag / f"rng_state_rank{ps.rank:05d}.pt")
    if _zero3(engine):
        # ZeRO-3 writes zero_pp_rank_{dp}_mp_rank_00_model_states.pt with a partitioned "module"; add the
        # contract's mp_rank_00_model_states.pt holding the consolidated weights (+ buffers) for readers
        full = engine._zero3_consolidated_16bit_state_dict()
        if ps.is_main:
            src = d / tmp_tag / f"zero_pp_rank_0_{model_states_name(0)}"
            sd = torch.load(src, map_location="cpu", weights_only=False)
            sd["module"] = full
            torch.save(sd, d / tmp_tag / model_states_name(0))
    ps.barrier()
    kill_at = os.environ.get(KILL_IN_SAVE_ENV)
    if kill_at is not None and int(kill_at) == int(iteration):
        import signal
        os.kill(os.getpid(), signal.SIGKILL)
    if ps.is_main:
        _commit_folder(d, d / tmp_tag, tag)
        write_latest(d, tag)
        if keep_last_n:
            prune_checkpoints(d, keep_last_n)
        else:
            remove_stale_tmp(d)
    ps.barrier()
    return tag


def prune_checkpoints(save_dir, keep_last_n: int) -> list:
    """Delete all but the newest keep_last_n complete checkpoints (never the latest one), and stale temp folders."""
    d = Path(save_dir)
    latest = latest_tag(d)
    tags = list_tags(d)
    keep = set(tags[-keep_last_n:]) | ({latest} if latest else set())
    removed = []
    for t in tags:
        if t not in keep:
            shutil.rmtree(d / t, ignore_errors=True)
            removed.append(t)
    remove_stale_tmp(d)
    return removed


def remove_stale_tmp(save_dir) -> None:
    """Remove the temp folders of saves that never completed (killed runs)."""
    for p in Path(save_dir).iterdir():
        if p.is_dir() and p.name.startswith(TMP_PREFIX):
            shutil.rmtree(p, ignore_errors=True)


def _zero3(engine) -> bool:
    return bool(getattr(engine, "zero_optimization_partition_weights", lambda: False)())


def _load_buffers_only(src, dst):
    """ZeRO-3 resume: parameters come from the ZeRO shards; only the buffers (L2E state) from 'module'."""
    own = dict(dst.named_buffers())
    for k, v in src.items():
        if k in own:
            own[k].copy_(v)


def _saved_meta(folder) -> tuple:
    """(tp, dp, zero_stage) a checkpoint folder was saved with; zero_stage None when unknown."""
    folder = Path(folder)
    path = folder / model_states_name(0)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except RuntimeError:                 # not a zip-format file: no mmap
        sd = _torch_load(path)
    except (OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read ({str(e).splitlines()[0][:200]})") from None
    tp = sd.get("tp") or sd.get("mp_world_size")
    dp = sd.get("dp") or sd.get("dp_world_size")
    neox = sd.get("neox_config")
    stage = None
    if isinstance(neox, dict):
        stage = int((neox.get("zero_optimization") or {}).get("stage", 0))
    del sd
    if tp is None:
        tp = sum(1 for _ in folder.glob("mp_rank_*_model_states.pt"))
    if dp is None:
        dp = sum(1 for _ in folder.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt")) or 1
    if stage is None:                    # no saved config: DeepSpeed's files tell ZeRO-3 and ZeRO 1 / 2 apart
        if any(folder.glob("zero_pp_rank_*_mp_rank_00_model_states.pt")):
            stage = 3
        elif any(folder.glob("zero_pp_rank_*_optim_states.pt")):
            stage = 1                    # 1 or 2: the same optimizer files (bf16_zero_pp_rank_*: ZeRO 0 with bf16)
    return int(tp), int(dp), stage


def saved_layout(folder) -> tuple:
    """(tp, dp) a checkpoint folder (``save_dir/global_stepN``) was saved with: the client state's ``tp`` /
    ``dp`` (DeepSpeed's ``mp_world_size`` / ``dp_world_size`` when absent), else the file counts. The model
    states are memory-mapped, so the weights are not read. The one reader of the saved layout (train.py's
    resume check and tools/reshard_checkpoint.py)."""
    return _saved_meta(folder)[:2]


def _same_optimizer_format(a: int, b: int) -> bool:
    # ZeRO 1 and 2 write and read the same optimizer shards (measured with DeepSpeed 0.19)
    return a == b or {a, b} <= {1, 2}


def check_resume_layout(load_dir, tag: str, tp: int, dp: int, zero_stage: int, load_optimizer: bool = True,
                        weights_only: bool = False) -> None:
    """Raise a one-line CheckpointError when this run (TP=tp x DP=dp, ZeRO zero_stage) cannot resume the
    checkpoint as it was saved, naming the fix.

    What DeepSpeed loads across layouts (measured with 0.19): a TP change never (each TP rank reads its own
    shard of every split tensor). A ZeRO stage change (the saved stage: the saved config's zero_optimization)
    with the optimizer state only between ZeRO 1 and 2 (the same shards); without it any change except into
    ZeRO-3. A DP change with ZeRO 0 saved and resumed (fp32, bf16: the optimizer state is replicated in the
    model states), and with ZeRO 0 / 1 / 2 when the optimizer state is not loaded (the fp32 master weights are
    rebuilt from the saved weights); not with ZeRO 1 / 2 and the optimizer state (DP-partitioned shards), nor
    with ZeRO 3 (weights and optimizer partitioned over DP; the resharding tool does not handle ZeRO 3).
    ``weights_only`` (finetune): only the TP degree matters."""
    folder = Path(load_dir) / tag
    saved_tp, saved_dp, saved_stage = _saved_meta(folder)
    if not weights_only and saved_tp == tp and saved_stage is not None and saved_stage != zero_stage:
        if zero_stage == 3:
            raise CheckpointError(f"{folder}: saved with ZeRO-{saved_stage}, this run uses ZeRO-3, which cannot load "
                                  f"it; resume with ZeRO-{saved_stage}, or take only the weights with finetune: true")
        if load_optimizer and not _same_optimizer_format(saved_stage, zero_stage):
            raise CheckpointError(f"{folder}: saved with ZeRO-{saved_stage}, this run uses ZeRO-{zero_stage}; DeepSpeed "
                                  f"cannot load a ZeRO-{saved_stage} optimizer state into ZeRO-{zero_stage}: resume "
                                  f"with ZeRO-{saved_stage}, or without the optimizer state (no-load-optim: true)")
    stages = {zero_stage} if saved_stage is None else {zero_stage, saved_stage}
    dp_ok = (weights_only or saved_dp == dp
             or (3 not in stages and (not load_optimizer or stages == {0})))
    if saved_tp == tp and dp_ok:
        return
    saved = f"TP={saved_tp} x DP={saved_dp}"
    run = f"TP={tp} x DP={dp}"
    if weights_only:
        raise CheckpointError(f"{folder}: saved with TP={saved_tp}, this run has TP={tp}; re-shard it first: "
                              f"python tools/reshard_checkpoint.py {load_dir} OUT --tp {tp} --dp {dp}, then load OUT")
    if saved_tp == tp and 3 in stages:
        raise CheckpointError(f"{folder}: saved as {saved}, this run is {run}; ZeRO-3 cannot change the DP size (its "
                              "weights and optimizer state are partitioned by DP rank, and tools/reshard_checkpoint.py "
                              f"does not handle ZeRO-3); resume with DP={saved_dp}, or take only the weights with "
                              "finetune: true")
    why = ("tensors are split by TP rank" if saved_tp != tp
           else f"ZeRO-{zero_stage} partitions the optimizer state by DP rank")
    raise CheckpointError(f"{folder}: saved as {saved}, this run is {run} ({why}); re-shard it first: "
                          f"python tools/reshard_checkpoint.py {load_dir} OUT --tp {tp} --dp {dp}, then load OUT"
                          + ("" if saved_tp != tp else ", or resume without the optimizer state (no-load-optim: true)"))


def load_checkpoint(engine, load_dir, ps, load_optimizer: bool = True, tag: Optional[str] = None,
                    layout_checked: bool = False) -> dict:
    """Resume engine (model, optimizer, loss scale) and this rank's RNG; returns the client state.

    A checkpoint saved in a TP / DP / ZeRO layout this run cannot load raises CheckpointError
    (check_resume_layout; skipped with ``layout_checked``, when the caller has already run it)."""
    d = Path(load_dir)
    tag = tag or latest_tag(d)
    if tag is None:
        raise CheckpointError(f"{d}: no checkpoint to load (no 'latest' file)")
    if not (d / tag / model_states_name(0)).is_file():
        raise CheckpointError(f"{d / tag}: missing {model_states_name(0)}; the checkpoint is incomplete")
    if not layout_checked:
        check_resume_layout(d, tag, ps.tp, ps.dp, int(engine.zero_optimization_stage()), load_optimizer)
    custom = _load_buffers_only if _zero3(engine) else None
    path, client = engine.load_checkpoint(str(d), tag=tag, load_optimizer_states=load_optimizer,
                                          load_lr_scheduler_states=False, custom_load_fn=custom)
    if path is None:
        raise CheckpointError(f"{d / tag}: DeepSpeed could not load the checkpoint")
    rng = d / tag / f"rng_state_rank{ps.rank:05d}.pt"
    if rng.is_file():
        set_rng_state(torch.load(rng, map_location="cpu", weights_only=False), ps)
    client = dict(client or {})
    client["tag"] = tag
    return client


def load_weights_into(model, load_dir, tp_rank: int = 0, tag: Optional[str] = None, strict: bool = True) -> dict:
    """finetune: copy the weights (and buffers) of TP rank tp_rank of a checkpoint into an unwrapped model."""
    d = Path(load_dir)
    tag = tag or latest_tag(d)
    if tag is None:
        raise CheckpointError(f"{d}: no checkpoint to load (no 'latest' file)")
    path = d / tag / model_states_name(tp_rank)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the checkpoint has fewer TP ranks than this run "
                              "(re-shard it to this model-parallel-size)")
    sd = _torch_load(path)
    module = sd["module"]
    own = model.state_dict()
    missing = [k for k in own if k not in module]
    if strict and any(not is_l2e_state_key(k) for k in missing):
        raise CheckpointError(f"{path}: missing weights {missing[:3]}...; does the config match the checkpoint?")
    for k, v in module.items():
        if k in own:
            if tuple(own[k].shape) != tuple(v.shape):
                raise CheckpointError(f"{path}: '{k}' has shape {tuple(v.shape)}, the model expects "
                                      f"{tuple(own[k].shape)}")
            with torch.no_grad():
                own[k].copy_(v.to(own[k].dtype))
    return {k: v for k, v in sd.items() if k != "module"}
