"""Checkpoints: names and readers, atomic saves with a manifest, safe loading, resume checks, TP re-sharding.

    from neox_l2e.checkpoint import latest_tag, list_tags, read_model_states, write_weights_checkpoint

files.py    names, tags, `latest`, the safe loader (weights_only + allow-list), atomic writes, the manifest
lock.py     one job per save folder
layout.py   what a checkpoint was saved with; whether this run can resume it (layout, config)
compat.py   which config changes a resume refuses / warns about
io.py       save / load with a DeepSpeed engine, readers for tools, the weights-only writer
tp_states.py  merge / split model states across TP degrees
reshard.py  re-shard a whole checkpoint (tools/reshard_checkpoint.py)

Errors are CheckpointError (ReshardError for the resharding tool), one line naming the file.
"""

from ..errors import CheckpointError, ReshardError
from .files import (
    FORMAT_VERSION,
    MANIFEST,
    TMP_PREFIX,
    latest_tag,
    list_tags,
    model_states_name,
    read_latest,
    read_manifest,
    rng_name,
    step_folders,
    step_of,
    tag_for,
    torch_load,
    verify_manifest,
    write_latest,
    write_manifest,
    zero_optim_name,
)
from .io import (
    acquire_save_lock,
    check_resume,
    load_checkpoint,
    load_weights_into,
    nonfinite_tensors,
    prune_checkpoints,
    read_model_states,
    remove_stale_tmp,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_weights_checkpoint,
)
from .layout import check_resume_config, check_resume_layout, saved_layout, saved_meta
from .lock import SaveLock

__all__ = [
    "CheckpointError",
    "ReshardError",
    "FORMAT_VERSION",
    "MANIFEST",
    "TMP_PREFIX",
    "SaveLock",
    "acquire_save_lock",
    "check_resume",
    "check_resume_config",
    "check_resume_layout",
    "latest_tag",
    "list_tags",
    "load_checkpoint",
    "load_weights_into",
    "model_states_name",
    "nonfinite_tensors",
    "prune_checkpoints",
    "read_latest",
    "read_manifest",
    "read_model_states",
    "remove_stale_tmp",
    "rng_name",
    "rng_state",
    "save_checkpoint",
    "saved_layout",
    "saved_meta",
    "set_rng_state",
    "step_folders",
    "step_of",
    "tag_for",
    "torch_load",
    "verify_manifest",
    "write_latest",
    "write_manifest",
    "write_weights_checkpoint",
    "zero_optim_name",
]
