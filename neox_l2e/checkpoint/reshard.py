"""Re-shard a training checkpoint to another tensor-/data-parallel layout (tools/reshard_checkpoint.py).

    report = reshard_checkpoint("runs/a", "runs/a-tp1", tp=1, dp=2)

Reads ``src/<tag>/mp_rank_XX_model_states.pt`` (+ the ZeRO shards ``zero_pp_rank_D_mp_rank_XX_optim_states.pt``
or, without ZeRO, the optimizer state inside the model states) and writes the same layout for TP=tp, DP=dp,
which train.py resumes from (``load: dst``) at the same iteration.

Carried over:
  * model weights and buffers, the L2E state included (count/mean/m2 split by neuron, tau replicated),
    vocab padding re-fitted to the new TP degree (merge_tp_states / split_tp_state);
  * iteration, consumed samples, the LR-scheduler state and the rest of the client state;
  * AdamW state (exp_avg, exp_avg_sq, step) and the fp32 master weights, for ZeRO stages 1 and 2 (rewritten as
    DeepSpeed's ZeRO shards for the new DP size, in its flat-partition layout) and for ZeRO 0 in fp32 (the
    torch optimizer state inside the model states).
Restarted:
  * the RNG states (python/numpy/torch and the dropout streams are per rank; the new ranks seed from the
    config's seed), and the fp16 loss scale (taken from DP rank 0 of TP rank 0 of the source, which equals
    all others);
  * the optimizer state in layouts this tool does not rewrite (ZeRO 0 with bf16/fp16: DeepSpeed's BF16/FP16
    optimizer wrappers; ZeRO with round-robin gradients or parameter alignment): the weights are carried,
    the optimizer starts fresh and the report says so.
ZeRO-3 with TP is refused by the config; a ZeRO-3 (TP=1) source is not supported.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ..errors import ReshardError
from .files import (
    TMP_PREFIX,
    latest_tag,
    model_states_name,
    torch_load,
    verify_manifest,
    write_latest,
    write_manifest,
    zero_optim_name,
    zero_prefix,
)
from .layout import saved_layout
from .tp_states import merge_tp_states, split_tp_state

OPTIM_KEYS = ("exp_avg", "exp_avg_sq")
ZERO_ALIGNMENT = 2  # DeepSpeed ZeRO-1/2: flat groups are padded to a multiple of 2 x DP

__all__ = ["ReshardError", "reshard_checkpoint"]


# ----------------------------------------------------------------------------------------------------------
# reading optimizer state as per-parameter tensors


def _zero_per_param(folder: Path, tp_rank: int, dp: int) -> tuple:
    """({name: {"fp32", "exp_avg", "exp_avg_sq"}}, template) of one TP rank from its DP shards (ZeRO 1/2)."""
    shards = []
    prefix = zero_prefix(folder)
    for d in range(dp):
        p = folder / zero_optim_name(d, tp_rank, prefix)
        if not p.is_file():
            raise ReshardError(f"{p}: missing ZeRO shard (the checkpoint says DP={dp})")
        shards.append(torch_load(p)["optimizer_state_dict"])
    first = shards[0]
    base = first["base_optimizer_state"]
    if not isinstance(base, dict):
        raise ReshardError("elastic ZeRO checkpoints are not supported by this tool")
    per_param: Dict[str, Dict[str, torch.Tensor]] = {}
    for g, mapping in enumerate(first["param_slice_mappings"]):
        names = list(mapping)
        for sd in shards[1:]:
            names += [n for n in sd["param_slice_mappings"][g] if n not in names]
        for name in names:
            parts = {k: [] for k in ("fp32",) + OPTIM_KEYS}
            for sd in shards:
                frag = sd["param_slice_mappings"][g].get(name)
                if frag is None:
                    continue
                start, numel = frag.start, frag.numel
                parts["fp32"].append(sd["single_partition_of_fp32_groups"][g][start : start + numel])
                st = sd["base_optimizer_state"]["state"].get(g, {})
                for k in OPTIM_KEYS:
                    if k in st:
                        parts[k].append(st[k][start : start + numel])
            per_param[name] = {k: torch.cat(v) for k, v in parts.items() if v}
    step = None
    for st in base["state"].values():
        if "step" in st:
            step = st["step"]
            break
    template = {
        k: v
        for k, v in first.items()
        if k
        not in (
            "base_optimizer_state",
            "single_partition_of_fp32_groups",
            "param_slice_mappings",
            "group_paddings",
            "param_alignment_paddings",
            "partition_count",
        )
    }
    template["param_groups"] = base["param_groups"]
    template["step"] = step
    return per_param, template


def _shape_params(per_param: dict, shapes: Dict[str, torch.Size]) -> dict:
    out = {}
    for name, d in per_param.items():
        out[name] = {k: v.reshape(shapes[name]) for k, v in d.items()}
    return out


def _torch_optimizer_per_param(opt_sd: dict, group_names: List[List[str]]) -> dict:
    """ZeRO 0 fp32: torch AdamW state_dict (indices in param-group order) -> {name: {exp_avg, exp_avg_sq, step}}."""
    out = {}
    for names, group in zip(group_names, opt_sd["param_groups"]):
        if len(names) != len(group["params"]):
            raise ReshardError("optimizer param groups do not match the model")
        for name, idx in zip(names, group["params"]):
            st = opt_sd["state"].get(idx)
            if st:
                out[name] = dict(st)
    return out


def _group_names(cfg, vocab_size, tp) -> List[List[str]]:
    """Parameter names of the optimizer's param groups (the training engine's grouping), in order."""
    from ..model.gpt_neox import GPTNeoX
    from ..model.param_groups import param_groups
    from ..parallel.state import ParallelState

    model = GPTNeoX(cfg, ParallelState.layout(tp, 0, device="meta"), vocab_size=vocab_size, init=False)
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in param_groups(model, cfg.optimizer.weight_decay)]


# ----------------------------------------------------------------------------------------------------------
# writing


def _zero_shards(per_param: dict, group_names: List[List[str]], dp: int, template: dict) -> List[dict]:
    """DeepSpeed ZeRO-1/2 shard dicts ("optimizer_state_dict") for DP ranks 0..dp-1 of one TP rank."""
    flats = {k: [] for k in ("fp32",) + OPTIM_KEYS}
    paddings, slice_maps, sizes = [], [[] for _ in range(dp)], []
    for names in group_names:
        total = sum(per_param[n]["fp32"].numel() for n in names)
        align = ZERO_ALIGNMENT * dp
        aligned = int(math.ceil(total / align)) * align
        part = aligned // dp
        sizes.append(part)
        for k in flats:
            flat = torch.zeros(aligned, dtype=torch.float32)
            off = 0
            for n in names:
                t = per_param[n][k].reshape(-1).float()
                flat[off : off + t.numel()] = t
                off += t.numel()
            flats[k].append(flat)
        paddings.append([aligned - total if r == dp - 1 else 0 for r in range(dp)])
        # fragment addresses of each parameter inside each partition
        from deepspeed.utils.tensor_fragment import fragment_address

        for r in range(dp):
            lo, hi = r * part, (r + 1) * part
            mapping, off = OrderedDict(), 0
            for n in names:
                numel = per_param[n]["fp32"].numel()
                s, e = max(off, lo), min(off + numel, hi)
                if s < e:
                    mapping[n] = fragment_address(numel=e - s, start=s - lo)
                off += numel
            slice_maps[r].append(mapping)
    out = []
    for r in range(dp):
        sd = {k: copy.deepcopy(v) for k, v in template.items() if k not in ("param_groups", "step")}
        state = {}
        for g in range(len(group_names)):
            lo, hi = r * sizes[g], (r + 1) * sizes[g]
            st = {k: flats[k][g][lo:hi].clone() for k in OPTIM_KEYS}
            if template.get("step") is not None:
                st["step"] = template["step"].clone() if torch.is_tensor(template["step"]) else template["step"]
            state[g] = st
        sd["base_optimizer_state"] = {"state": state, "param_groups": copy.deepcopy(template["param_groups"])}
        sd["single_partition_of_fp32_groups"] = [
            flats["fp32"][g][r * sizes[g] : (r + 1) * sizes[g] - paddings[g][r]].clone()
            for g in range(len(group_names))
        ]
        sd["group_paddings"] = [paddings[g][r] for g in range(len(group_names))]
        sd["param_alignment_paddings"] = [[0] * len(names) for names in group_names]
        sd["partition_count"] = [dp] * len(group_names)
        sd["param_slice_mappings"] = slice_maps[r]
        out.append(sd)
    return out


def _split_named(per_param_by_rank: List[dict], cfg, tp: int, key: str, vocab_size) -> List[dict]:
    merged = merge_tp_states(
        [{n: d[key] for n, d in pp.items() if key in d} for pp in per_param_by_rank],
        cfg,
        vocab_size,
        check_replicated=False,
    )
    return split_tp_state(merged, cfg, tp, vocab_size)


# ----------------------------------------------------------------------------------------------------------


def reshard_checkpoint(
    src,
    dst,
    tp: int,
    dp: Optional[int] = None,
    tag: Optional[str] = None,
    carry_optimizer: bool = True,
    verify: bool = True,
    log=None,
) -> dict:
    """Write ``dst/<tag>`` (and ``dst/latest``) for TP=tp x DP=dp from the checkpoint ``src/<tag>``.

    Returns a report: {"tag", "from": (tp, dp), "to": (tp, dp), "zero_stage", "optimizer": "carried" or the
    reason it restarts, "carried": [...], "restarted": [...]}.
    """
    from ..config import config_from_checkpoint_dict

    src, dst = Path(src), Path(dst)
    tag = tag or latest_tag(src)
    if tag is None:
        raise ReshardError(f"{src}: no checkpoint (no 'latest' file)")
    folder = src / tag
    _check_not_nested(src, dst)
    verify_manifest(folder, verify=verify, log=log)
    states = []
    while (folder / model_states_name(len(states))).is_file():
        states.append(torch_load(folder / model_states_name(len(states))))
    if not states:
        raise ReshardError(f"{folder}: no {model_states_name(0)}")
    src_tp = len(states)
    first = states[0]
    cfg = config_from_checkpoint_dict(first["neox_config"])
    src_dp = saved_layout(folder)[1]
    dp = int(dp or src_dp)
    vocab_size = cfg.model.vocab_size or None
    new_cfg = cfg.replace(model_parallel_size=tp)
    stage = cfg.zero_stage
    if stage == 3:
        raise ReshardError("ZeRO-3 checkpoints are not supported by the resharding tool")
    if (new_cfg.model.num_attention_heads % tp) or (new_cfg.ffn_size % tp):
        raise ReshardError(f"TP={tp} does not divide the heads / MLP width")

    modules = [s["module"] for s in states]
    new_modules = split_tp_state(merge_tp_states(modules, cfg, vocab_size), new_cfg, tp, vocab_size)

    # ---- optimizer ----
    zero_cfg = cfg.parallel.zero_optimization or {}
    optimizer_note = "carried"
    new_opt_stage0 = [None] * tp
    new_zero = None
    group_names = _group_names(cfg, vocab_size, src_tp)
    if stage in (1, 2):
        if (
            zero_cfg.get("round_robin_gradients")
            or zero_cfg.get("parameter_alignment")
            or zero_cfg.get("elastic_checkpoint")
        ):
            optimizer_note = (
                "restarted (round_robin_gradients / parameter_alignment / elastic_checkpoint set): "
                "resume with no-load-optim: true"
            )
        else:
            per_rank, templates = [], []
            for r in range(src_tp):
                pp, tpl = _zero_per_param(folder, r, src_dp)
                shapes = {n: modules[r][n].shape for n in pp}
                if not carry_optimizer:  # fresh AdamW state; fp32 masters from the (merged) module weights
                    pp = {
                        n: {
                            "fp32": modules[r][n].float(),
                            "exp_avg": torch.zeros(shapes[n]),
                            "exp_avg_sq": torch.zeros(shapes[n]),
                        }
                        for n in pp
                    }
                    tpl["step"] = torch.tensor(0.0)
                    optimizer_note = "restarted (carry_optimizer=False)"
                per_rank.append(_shape_params(pp, shapes))
                templates.append(tpl)
            split = {k: _split_named(per_rank, cfg, tp, k, vocab_size) for k in ("fp32",) + OPTIM_KEYS}
            new_zero = []
            for r in range(tp):
                pp = {n: {k: split[k][r][n] for k in split} for n in split["fp32"][r]}
                new_zero.append(_zero_shards(pp, group_names, dp, templates[0]))
    elif not carry_optimizer:
        optimizer_note = "restarted (carry_optimizer=False)"
    else:
        if first.get("optimizer") is None:
            optimizer_note = "restarted (no optimizer state in the source)"
        elif cfg.precision_name != "fp32":
            optimizer_note = (
                "restarted (ZeRO 0 with fp16/bf16 keeps its state in DeepSpeed's optimizer wrapper): "
                "resume with no-load-optim: true"
            )
        else:
            per_rank = [_torch_optimizer_per_param(s["optimizer"], group_names) for s in states]
            split = {k: _split_named(per_rank, cfg, tp, k, vocab_size) for k in OPTIM_KEYS}
            step = next((d["step"] for d in per_rank[0].values() if "step" in d), None)
            for r in range(tp):
                opt = copy.deepcopy({k: v for k, v in first["optimizer"].items() if k != "state"})
                state = {}
                idx = 0
                for names in group_names:
                    for n in names:
                        if n in split["exp_avg"][r]:
                            state[idx] = {
                                "step": step.clone() if torch.is_tensor(step) else step,
                                "exp_avg": split["exp_avg"][r][n],
                                "exp_avg_sq": split["exp_avg_sq"][r][n],
                            }
                        idx += 1
                opt["state"] = state
                new_opt_stage0[r] = opt

    # ---- write ----
    prefix = zero_prefix(folder)
    tmp = dst / f"{TMP_PREFIX}{tag}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    new_groups = _group_names(new_cfg, vocab_size, tp)
    for r in range(tp):
        sd = {k: v for k, v in first.items() if k != "module"}
        sd["module"] = new_modules[r]
        sd["neox_config"] = new_cfg.to_dict()
        sd["mp_world_size"], sd["dp_world_size"] = tp, dp
        sd["tp"], sd["dp"] = tp, dp
        if "padded_vocab_size" in sd:
            sd["padded_vocab_size"] = new_cfg.padded_vocab_size(tp, vocab_size)
        if sd.get("param_shapes") is not None:
            sd["param_shapes"] = [OrderedDict((n, new_modules[r][n].shape) for n in names) for names in new_groups]
        if "checkpoint_parallel_dimensions" in sd and isinstance(sd["checkpoint_parallel_dimensions"], dict):
            dims = dict(sd["checkpoint_parallel_dimensions"])
            for k in dims:
                if "tp" in k.lower() or "tensor" in k.lower():
                    dims[k] = tp
            sd["checkpoint_parallel_dimensions"] = dims
        if stage == 0:
            if optimizer_note == "carried":
                sd["optimizer"] = new_opt_stage0[r]
            elif (
                isinstance(first.get("optimizer"), dict)
                and "param_groups" in first["optimizer"]
                and cfg.precision_name == "fp32"
            ):
                sd["optimizer"] = {"state": {}, "param_groups": copy.deepcopy(first["optimizer"]["param_groups"])}
            else:
                sd["optimizer"] = None
        sd["resharded_from"] = {"tp": src_tp, "dp": src_dp, "optimizer": optimizer_note}
        torch.save(sd, tmp / model_states_name(r))
        if new_zero is not None:
            for d, shard in enumerate(new_zero[r]):
                torch.save(
                    {
                        "optimizer_state_dict": shard,
                        "ds_config": first.get("ds_config"),
                        "ds_version": first.get("ds_version"),
                    },
                    tmp / zero_optim_name(d, r, prefix),
                )
    write_manifest(tmp)
    final = dst / tag
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_latest(dst, tag)
    carried = ["model weights and buffers (L2E state)", "iteration / consumed samples / LR scheduler"]
    restarted = ["RNG states (reseeded from the config seed)"]
    if optimizer_note == "carried":
        carried.append("AdamW state and fp32 master weights")
    else:
        restarted.append(f"optimizer: {optimizer_note}")
    return {
        "tag": tag,
        "from": (src_tp, src_dp),
        "to": (tp, dp),
        "zero_stage": stage,
        "optimizer": optimizer_note,
        "carried": carried,
        "restarted": restarted,
        "path": str(final),
    }


def _check_not_nested(src: Path, dst: Path) -> None:
    """The output may not be the source folder, nor inside it, nor hold it (a rewrite would replace its files)."""
    a, b = src.resolve(), dst.resolve()
    if a == b or a in b.parents or b in a.parents:
        raise ReshardError(
            f"{dst}: is the source {src}, inside it, or holds it; write the re-sharded checkpoint to a separate folder"
        )
