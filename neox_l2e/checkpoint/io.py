"""Saving and loading checkpoints: atomic DeepSpeed checkpoint folders with a manifest, and readers for tools.

Layout (docs/checkpoints.md is the contract):

    save_dir/
      latest                                  the newest complete tag; written last (temp file, fsync, os.replace)
      .lock                                   host and pid of the job saving here (lock.py)
      global_step{N}/
        mp_rank_{tp:02d}_model_states.pt      DeepSpeed's file: "module" (full model state_dict of this TP
                                              rank, L2E buffers included) + our client state
        zero_pp_rank_{dp}_mp_rank_00_model_states.pt   ZeRO-3 only: DeepSpeed's per-rank files (partitioned
                                              "module"); mp_rank_00_model_states.pt is then written by us
                                              with the consolidated weights
        zero_pp_rank_{dp}_mp_rank_{tp:02d}_optim_states.pt   ZeRO optimizer shards (ZeRO >= 1)
        rng_state_rank{R:05d}.pt              python / numpy / torch (/ cuda) RNG of global rank R
        manifest.json                         size and sha256 of every other file of the folder

A save writes into ``save_dir/.tmp-global_step{N}``; when every rank has finished, the ranks hash the files (a
share each), rank 0 writes the manifest, renames the folder to ``global_step{N}`` and only then moves
``latest``. A save killed at any point leaves the previous checkpoint, and ``latest``, untouched.

Readers (no DeepSpeed, no process group): ``latest_tag``, ``list_tags``, ``read_model_states``;
writer for importers: ``write_weights_checkpoint`` (a weights-only checkpoint that train.py loads
with ``finetune: true``).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..errors import CheckpointError
from ..l2e.keys import is_l2e_state_key
from .files import (
    FORMAT_VERSION,
    TMP_PREFIX,
    hash_entries,
    latest_tag,
    list_tags,
    manifest_names,
    model_states_name,
    os_reason,
    read_latest,
    rng_name,
    step_of,
    tag_for,
    torch_load,
    verify_manifest,
    write_latest,
    write_manifest,
)
from .layout import check_resume_config, check_resume_layout, saved_meta
from .lock import SaveLock


def _note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# readers


def read_model_states(
    save_dir, tag: Optional[str] = None, verify: bool = True, log: Optional[Callable[[str], None]] = _note
) -> tuple:
    """(cfg_dict, [state_dict per TP rank], client_state of TP rank 0) of a checkpoint (default: latest).

    cfg_dict is the resolved config saved with the run (``cfg.to_dict()``); rebuild it with
    ``neox_l2e.config.config_from_checkpoint_dict``. The state dicts are on CPU in the dtype the
    model had (fp16/bf16 runs: half precision weights). Each file is checked against the manifest first
    (``verify`` False skips that, saying so through ``log``).
    """
    d = Path(save_dir)
    tag = tag or latest_tag(d)
    if tag is None:
        raise CheckpointError(f"{d}: no checkpoint (no 'latest' file); pass a tag or a folder with a checkpoint")
    folder = d / tag
    if not (folder / model_states_name(0)).is_file():
        raise CheckpointError(f"{folder}: no {model_states_name(0)}; not a complete checkpoint")
    names = []
    while (folder / model_states_name(len(names))).is_file():
        names.append(model_states_name(len(names)))
    verify_manifest(folder, names, verify=verify, log=log)
    states, client = [], None
    for rank, name in enumerate(names):
        sd = torch_load(folder / name)
        if not isinstance(sd, dict) or "module" not in sd:
            raise CheckpointError(f"{folder / name}: no 'module' entry")
        states.append(sd["module"])
        if rank == 0:
            client = {k: v for k, v in sd.items() if k != "module"}
    cfg_dict = client.get("neox_config")
    if cfg_dict is None:
        raise CheckpointError(f"{folder / model_states_name(0)}: no 'neox_config' entry (not a neox-l2e checkpoint)")
    return cfg_dict, states, client


def write_weights_checkpoint(
    save_dir,
    cfg,
    state_dicts_per_tp_rank: Sequence[dict],
    tag: str = "global_step0",
    client_state: Optional[dict] = None,
) -> Path:
    """A weights-only checkpoint (no optimizer) in the same layout; train.py starts from it with finetune: true.

    ``state_dicts_per_tp_rank[r]`` is the model state_dict of TP rank r (one entry for TP 1).
    """
    d = Path(save_dir)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / (TMP_PREFIX + tag)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    base = {
        "neox_config": cfg.to_dict(),
        "iteration": step_of(tag) or 0,
        "consumed_train_samples": 0,
        "neox_l2e_format": FORMAT_VERSION,
        "weights_only": True,
        "tp": len(state_dicts_per_tp_rank),
        "dp_world_size": 1,
        "mp_world_size": len(state_dicts_per_tp_rank),
    }
    base.update(client_state or {})
    for r, sd in enumerate(state_dicts_per_tp_rank):
        entry = dict(base)
        entry["module"] = {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in sd.items()}
        torch.save(entry, tmp / model_states_name(r))
    write_manifest(tmp)
    commit_folder(d, tmp, tag)
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
# ranks agreeing


def agree(ok: bool, ps) -> bool:
    """True when ``ok`` holds on every rank (an all-reduce when several ranks run), so that all raise together."""
    import torch.distributed as dist

    if ps is None or getattr(ps, "world_size", 1) <= 1 or not dist.is_initialized():
        return ok
    flag = torch.tensor([0.0 if ok else 1.0], device=getattr(ps, "device", "cpu"))
    dist.all_reduce(flag)
    return float(flag.item()) == 0.0


def _raise_together(err: Optional[CheckpointError], ps, what: str) -> None:
    if not agree(err is None, ps):
        if err is not None:
            raise err
        raise CheckpointError(f"{what}: another rank refused it (its error names the file)")


def _gather_dicts(part: dict, ps) -> dict:
    """The union of every rank's dict (all_gather_object when several ranks run)."""
    import torch.distributed as dist

    if ps is None or getattr(ps, "world_size", 1) <= 1 or not dist.is_initialized():
        return dict(part)
    parts = [None] * ps.world_size
    dist.all_gather_object(parts, part)
    out = {}
    for p in parts:
        out.update(p)
    return out


def acquire_save_lock(save_dir, ps=None) -> Optional[SaveLock]:
    """Rank 0 takes save_dir's lock (lock.py); every rank raises the same one-line error when it is held."""
    lock, err = None, None
    if ps is None or getattr(ps, "is_main", True):
        try:
            lock = SaveLock.acquire(save_dir)
        except CheckpointError as e:
            err = e
    _raise_together(err, ps, f"{save_dir}")
    return lock


# ----------------------------------------------------------------------------------------------
# saving with a DeepSpeed engine


def commit_folder(save_dir: Path, tmp: Path, tag: str) -> None:
    """Rename a finished temp folder to save_dir/tag (replacing a stale folder of that name)."""
    final = save_dir / tag
    if final.exists():  # a stale folder of that name (not `latest`, see save_checkpoint)
        trash = save_dir / f"{TMP_PREFIX}old-{tag}-{os.getpid()}"
        os.replace(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(tmp, final)


def nonfinite_tensors(module) -> list:
    """Names of the parameters of module holding NaN or inf, and of its floating buffers holding NaN (the L2E
    threshold is +inf until initialised); this rank's shard under ZeRO-3."""
    bad = []
    with torch.no_grad():
        for kind, named in (("param", module.named_parameters()), ("buffer", module.named_buffers())):
            for name, t in named:
                t = getattr(t, "ds_tensor", None) if getattr(t, "ds_tensor", None) is not None else t
                if not (torch.is_tensor(t) and t.is_floating_point() and t.numel()):
                    continue
                ok = torch.isfinite(t).all() if kind == "param" else ~torch.isnan(t).any()
                if not bool(ok):
                    bad.append(name)
    return bad


def save_checkpoint(
    engine, save_dir, iteration: int, client_state: dict, ps, keep_last_n: Optional[int] = None
) -> Optional[str]:
    """Save a complete, resumable checkpoint of `engine` as global_step{iteration}; every rank calls this.

    Returns the tag, or None when that tag is already the latest checkpoint (nothing to do). Weights holding
    NaN / inf are never saved: CheckpointError on every rank, the previous checkpoint stays `latest`.
    """
    d = Path(save_dir)
    tag = tag_for(iteration)
    if read_latest(d) == tag and (d / tag / model_states_name(0)).is_file():
        return None
    bad = nonfinite_tensors(engine.module)
    err = None
    if bad:
        err = CheckpointError(
            f"step {iteration}: the weights hold NaN/inf ({', '.join(bad[:3])}"
            f"{' ...' if len(bad) > 3 else ''}); not saving {d / tag} (the previous checkpoint "
            f"stays latest: {read_latest(d) or 'none'})"
        )
    _raise_together(err, ps, f"step {iteration}: the weights hold NaN/inf; not saving {d / tag}")
    tmp_tag = TMP_PREFIX + tag
    if ps.is_main:
        d.mkdir(parents=True, exist_ok=True)
        if (d / tmp_tag).exists():
            shutil.rmtree(d / tmp_tag)
    ps.barrier()
    state = dict(client_state)
    state.setdefault("neox_l2e_format", FORMAT_VERSION)
    err = None
    try:
        engine.save_checkpoint(str(d), tag=tmp_tag, client_state=state, save_latest=False)
        torch.save(rng_state(ps), d / tmp_tag / rng_name(ps.rank))
        if _zero3(engine):
            # ZeRO-3 writes zero_pp_rank_{dp}_mp_rank_00_model_states.pt with a partitioned "module"; add the
            # contract's mp_rank_00_model_states.pt holding the consolidated weights (+ buffers) for readers
            full = engine._zero3_consolidated_16bit_state_dict()
            if ps.is_main:
                src = d / tmp_tag / f"zero_pp_rank_0_{model_states_name(0)}"
                sd = torch_load(src)
                sd["module"] = full
                torch.save(sd, d / tmp_tag / model_states_name(0))
    except (OSError, RuntimeError) as e:
        reason = _write_failure(e, d)
        if reason is None:
            raise
        err = CheckpointError(
            f"{d / tag}: cannot save the checkpoint ({reason}); the previous checkpoint stays latest: "
            f"{read_latest(d) or 'none'}"
        )
    if not agree(err is None, ps):
        if ps.is_main:
            shutil.rmtree(d / tmp_tag, ignore_errors=True)  # the partial save: give its space back
        raise err or CheckpointError(f"step {iteration}: saving {d / tag} failed on another rank (its error says why)")
    ps.barrier()
    # every rank hashes a share of the files; rank 0 writes the manifest
    names = manifest_names(d / tmp_tag)
    entries = _gather_dicts(hash_entries(d / tmp_tag, names[ps.rank :: ps.world_size]), ps)
    if ps.is_main:
        write_manifest(d / tmp_tag, entries)
        commit_folder(d, d / tmp_tag, tag)
        write_latest(d, tag)
        if keep_last_n:
            prune_checkpoints(d, keep_last_n)
        else:
            remove_stale_tmp(d)
    ps.barrier()
    return tag


_LOW_SPACE = 256 << 20  # bytes: below this a failed torch.save is reported as a full disk


def _write_failure(e: BaseException, save_dir: Path) -> Optional[str]:
    """The one-line reason of a failed checkpoint write: "disk full" for ENOSPC, and for torch's stream writer
    error when the disk has under 256 MiB left; None for an error that is not a failed write (re-raised)."""
    if isinstance(e, OSError):
        return os_reason(e)
    first = (str(e).splitlines() or [""])[0]
    if not any(s in first for s in ("inline_container", "PytorchStreamWriter", "file write failed")):
        return None
    try:
        free = shutil.disk_usage(save_dir).free
    except OSError:
        return f"write failed: {first[:120]}"
    if free < _LOW_SPACE:
        return f"disk full: {free >> 20} MiB left"
    return f"write failed: {first[:120]}"


def prune_checkpoints(save_dir, keep_last_n: int) -> list:
    """Delete all but the newest keep_last_n complete checkpoints (never the latest one), and stale temp folders."""
    d = Path(save_dir)
    latest = read_latest(d)
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


# ----------------------------------------------------------------------------------------------
# loading


def rank_files(folder, ps, weights_only: bool = False) -> list:
    """The files of a checkpoint folder that this rank reads when resuming (checked against the manifest);
    ``weights_only`` (finetune): its model states only."""
    folder = Path(folder)
    tp_rank = getattr(ps, "tp_rank", 0)
    if weights_only:
        return sorted({model_states_name(tp_rank), model_states_name(0)})
    names = {model_states_name(tp_rank), model_states_name(0), rng_name(getattr(ps, "rank", 0))}
    names.update(p.name for p in folder.glob(f"*zero_pp_rank_*_mp_rank_{tp_rank:02d}_*.pt"))
    return sorted(names)


def check_resume(cfg, load_dir, tag: str, ps, log: Optional[Callable[[str], None]] = None) -> list:
    """Before anything is built: this rank's files match the manifest (``checkpoint-verify``), the config does
    not change the model (resume only; changed L2E / data / batch keys give one warning line, returned and
    printed by rank 0), and the TP / DP / ZeRO layout can be loaded. Raises one CheckpointError line on every
    rank."""
    t = cfg.training
    folder = Path(load_dir) / tag
    log = log if log is not None else (_note if getattr(ps, "is_main", True) else None)
    err, warnings, meta = None, [], None
    try:
        verify_manifest(
            folder,
            rank_files(folder, ps, weights_only=t.finetune),
            verify=getattr(t, "checkpoint_verify", True),
            log=log,
        )
        meta = saved_meta(folder)
    except CheckpointError as e:
        err = e
    _raise_together(err, ps, str(folder))
    if not t.finetune:
        warnings = check_resume_config(folder, meta[3], cfg.to_dict(), log=log)
    check_resume_layout(
        load_dir,
        tag,
        ps.tp,
        ps.dp,
        cfg.zero_stage,
        load_optimizer=not t.no_load_optim,
        weights_only=t.finetune,
        meta=meta,
    )
    return warnings


@contextlib.contextmanager
def safe_engine_loads(engine):
    """Make DeepSpeed's engine.load_checkpoint read every file through torch_load (weights_only + allow-list):
    all its model and optimizer reads go through engine.checkpoint_engine.load."""
    ce = getattr(engine, "checkpoint_engine", None)
    if ce is None:
        raise CheckpointError("this DeepSpeed engine has no checkpoint_engine; cannot load a checkpoint safely")

    def load(path, map_location=None):
        return torch_load(path, map_location="cpu")

    ce.load = load
    try:
        yield
    finally:
        del ce.load


def _load_buffers_only(src, dst):
    """ZeRO-3 resume: parameters come from the ZeRO shards; only the buffers (L2E state) from 'module'."""
    own = dict(dst.named_buffers())
    for k, v in src.items():
        if k in own:
            own[k].copy_(v)


def load_checkpoint(
    engine,
    load_dir,
    ps,
    load_optimizer: bool = True,
    tag: Optional[str] = None,
    layout_checked: bool = False,
    verify: bool = True,
) -> dict:
    """Resume engine (model, optimizer, loss scale) and this rank's RNG; returns the client state.

    Every file is read with weights_only=True (safe_engine_loads). Unless ``layout_checked`` (the caller ran
    check_resume), this rank's files are checked against the manifest and a checkpoint saved in a TP / DP / ZeRO
    layout this run cannot load raises CheckpointError. A missing RNG file is an error."""
    d = Path(load_dir)
    tag = tag or latest_tag(d)
    if tag is None:
        raise CheckpointError(f"{d}: no checkpoint to load (no 'latest' file)")
    if not (d / tag / model_states_name(0)).is_file():
        raise CheckpointError(f"{d / tag}: missing {model_states_name(0)}; the checkpoint is incomplete")
    if not layout_checked:
        verify_manifest(d / tag, rank_files(d / tag, ps), verify=verify, log=_note if ps.is_main else None)
        check_resume_layout(d, tag, ps.tp, ps.dp, int(engine.zero_optimization_stage()), load_optimizer)
    custom = _load_buffers_only if _zero3(engine) else None
    with safe_engine_loads(engine):
        path, client = engine.load_checkpoint(
            str(d), tag=tag, load_optimizer_states=load_optimizer, load_lr_scheduler_states=False, custom_load_fn=custom
        )
    if path is None:
        raise CheckpointError(f"{d / tag}: DeepSpeed could not load the checkpoint")
    client = dict(client or {})
    rng = d / tag / rng_name(ps.rank)
    reseeded = "resharded_from" in client  # the resharding tool restarts the RNGs (from the seed)
    err = (
        None
        if rng.is_file() or reseeded
        else CheckpointError(
            f"{rng}: missing; the checkpoint has no RNG state for rank {ps.rank} (saved with fewer ranks? re-shard "
            "it with tools/reshard_checkpoint.py, or resume from another checkpoint)"
        )
    )
    _raise_together(err, ps, f"{d / tag}")
    if rng.is_file():
        set_rng_state(torch_load(rng), ps)
    client["tag"] = tag
    return client


def load_weights_into(
    model, load_dir, tp_rank: int = 0, tag: Optional[str] = None, strict: bool = True, verify: bool = False
) -> dict:
    """finetune: copy the weights (and buffers) of TP rank tp_rank of a checkpoint into an unwrapped model.

    The file is read safely (torch_load) but not checked against the manifest unless ``verify``: the Trainer
    has checked it already (check_resume); other callers pass verify=True."""
    d = Path(load_dir)
    tag = tag or latest_tag(d)
    if tag is None:
        raise CheckpointError(f"{d}: no checkpoint to load (no 'latest' file)")
    path = d / tag / model_states_name(tp_rank)
    if not path.is_file():
        raise CheckpointError(
            f"{path}: missing; the checkpoint has fewer TP ranks than this run "
            "(re-shard it to this model-parallel-size)"
        )
    verify_manifest(d / tag, [path.name], verify=verify)
    sd = torch_load(path)
    module = sd["module"]
    own = model.state_dict()
    missing = [k for k in own if k not in module]
    if strict and any(not is_l2e_state_key(k) for k in missing):
        raise CheckpointError(f"{path}: missing weights {missing[:3]}...; does the config match the checkpoint?")
    for k, v in module.items():
        if k in own:
            if tuple(own[k].shape) != tuple(v.shape):
                raise CheckpointError(
                    f"{path}: '{k}' has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}"
                )
            with torch.no_grad():
                own[k].copy_(v.to(own[k].dtype))
    return {k: v for k, v in sd.items() if k != "module"}
