"""What a checkpoint was saved with (TP, DP, ZeRO stage, config) and whether this run can resume it."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..errors import CheckpointError
from .files import model_states_name, torch_load


def saved_meta(folder) -> tuple:
    """(tp, dp, zero_stage, neox_config) a checkpoint folder was saved with; zero_stage None when unknown,
    neox_config None without a saved config. The model states are memory-mapped: the weights are not read."""
    folder = Path(folder)
    path = folder / model_states_name(0)
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {model_states_name(0)}; not a complete checkpoint")
    sd = torch_load(path, mmap=True)
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: not a checkpoint dict")
    tp = sd.get("tp") or sd.get("mp_world_size")
    dp = sd.get("dp") or sd.get("dp_world_size")
    neox = sd.get("neox_config")
    neox = dict(neox) if isinstance(neox, dict) else None
    stage = None
    if neox is not None:
        stage = int((neox.get("zero_optimization") or {}).get("stage", 0))
    del sd
    if tp is None:
        tp = sum(1 for _ in folder.glob("mp_rank_*_model_states.pt"))
    if dp is None:
        dp = sum(1 for _ in folder.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt")) or 1
    if stage is None:  # no saved config: DeepSpeed's files tell ZeRO-3 and ZeRO 1 / 2 apart
        if any(folder.glob("zero_pp_rank_*_mp_rank_00_model_states.pt")):
            stage = 3
        elif any(folder.glob("zero_pp_rank_*_optim_states.pt")):
            stage = 1  # 1 or 2: the same optimizer files (bf16_zero_pp_rank_*: ZeRO 0 with bf16)
    return int(tp), int(dp), stage, neox


def saved_layout(folder) -> tuple:
    """(tp, dp) a checkpoint folder (``save_dir/global_stepN``) was saved with: the client state's ``tp`` /
    ``dp`` (DeepSpeed's ``mp_world_size`` / ``dp_world_size`` when absent), else the file counts. The one reader
    of the saved layout (train.py's resume check and tools/reshard_checkpoint.py)."""
    return saved_meta(folder)[:2]


def _same_optimizer_format(a: int, b: int) -> bool:
    # ZeRO 1 and 2 write and read the same optimizer shards (measured with DeepSpeed 0.19)
    return a == b or {a, b} <= {1, 2}


def check_resume_layout(
    load_dir,
    tag: str,
    tp: int,
    dp: int,
    zero_stage: int,
    load_optimizer: bool = True,
    weights_only: bool = False,
    meta: Optional[tuple] = None,
) -> None:
    """Raise a one-line CheckpointError when this run (TP=tp x DP=dp, ZeRO zero_stage) cannot resume the
    checkpoint as it was saved, naming the fix.

    What DeepSpeed loads across layouts (measured with 0.19): a TP change never (each TP rank reads its own
    shard of every split tensor). A ZeRO stage change (the saved stage: the saved config's zero_optimization)
    with the optimizer state only between ZeRO 1 and 2 (the same shards); without it any change except into
    ZeRO-3. A DP change with ZeRO 0 saved and resumed (fp32, bf16: the optimizer state is replicated in the
    model states), and with ZeRO 0 / 1 / 2 when the optimizer state is not loaded (the fp32 master weights are
    rebuilt from the saved weights); not with ZeRO 1 / 2 and the optimizer state (DP-partitioned shards), nor
    with ZeRO 3 (weights and optimizer partitioned over DP; the resharding tool does not handle ZeRO 3).
    ``weights_only`` (finetune): only the TP degree matters. ``meta``: saved_meta of the folder, when read."""
    folder = Path(load_dir) / tag
    saved_tp, saved_dp, saved_stage = (meta or saved_meta(folder))[:3]
    if not weights_only and saved_tp == tp and saved_stage is not None and saved_stage != zero_stage:
        if zero_stage == 3:
            raise CheckpointError(
                f"{folder}: saved with ZeRO-{saved_stage}, this run uses ZeRO-3, which cannot "
                f"load it; resume with ZeRO-{saved_stage}, or take only the weights with "
                "finetune: true"
            )
        if load_optimizer and not _same_optimizer_format(saved_stage, zero_stage):
            raise CheckpointError(
                f"{folder}: saved with ZeRO-{saved_stage}, this run uses ZeRO-{zero_stage}; DeepSpeed "
                f"cannot load a ZeRO-{saved_stage} optimizer state into ZeRO-{zero_stage}: resume "
                f"with ZeRO-{saved_stage}, or without the optimizer state (no-load-optim: true)"
            )
    stages = {zero_stage} if saved_stage is None else {zero_stage, saved_stage}
    dp_ok = weights_only or saved_dp == dp or (3 not in stages and (not load_optimizer or stages == {0}))
    if saved_tp == tp and dp_ok:
        return
    saved = f"TP={saved_tp} x DP={saved_dp}"
    run = f"TP={tp} x DP={dp}"
    if weights_only:
        raise CheckpointError(
            f"{folder}: saved with TP={saved_tp}, this run has TP={tp}; re-shard it first: "
            f"python tools/reshard_checkpoint.py {load_dir} OUT --tp {tp} --dp {dp}, then load OUT"
        )
    if saved_tp == tp and 3 in stages:
        raise CheckpointError(
            f"{folder}: saved as {saved}, this run is {run}; ZeRO-3 cannot change the DP size (its "
            "weights and optimizer state are partitioned by DP rank, and tools/reshard_checkpoint.py "
            f"does not handle ZeRO-3); resume with DP={saved_dp}, or take only the weights with "
            "finetune: true"
        )
    why = (
        "tensors are split by TP rank"
        if saved_tp != tp
        else f"ZeRO-{zero_stage} partitions the optimizer state by DP rank"
    )
    raise CheckpointError(
        f"{folder}: saved as {saved}, this run is {run} ({why}); re-shard it first: "
        f"python tools/reshard_checkpoint.py {load_dir} OUT --tp {tp} --dp {dp}, then load OUT"
        + ("" if saved_tp != tp else ", or resume without the optimizer state (no-load-optim: true)")
    )


def check_resume_config(folder, saved_cfg: Optional[dict], new_cfg: dict, log=None) -> list:
    """Refuse (one CheckpointError line naming the keys) a resume whose config changes the model; return the
    warning lines for allowed changes (L2E, data, batch, optimizer), printed through ``log`` when given."""
    from .compat import config_changes

    if saved_cfg is None:
        return []
    refused, warned = config_changes(saved_cfg, new_cfg)
    if refused:
        raise CheckpointError(
            f"{folder}: this config changes the model of the checkpoint ({'; '.join(refused)}); "
            "resume with the saved values, or start a new run from its weights with finetune: true"
        )
    lines = []
    if warned:
        lines.append(f"warning: resuming {folder} with a changed config: {'; '.join(warned)}")
        if log:
            for line in lines:
                log(line)
    return lines
