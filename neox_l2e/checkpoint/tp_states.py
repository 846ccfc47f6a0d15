"""Merge tensor-parallel model states into one full state and split a full state for any TP degree.

    full = merge_tp_states([state_rank0, state_rank1, ...], cfg)     # the TP=1 layout
    per_rank = split_tp_state(full, cfg, tp=4)                        # [state_rank0, ..., state_rank3]

How each key is partitioned is read from a meta-device model (no memory, no process group):
parameters carry ``tp_partition_dim`` (neox_l2e.parallel.layers); a buffer whose shape differs
between a TP=1 and a TP=n meta model is split along the dim that differs (the L2E statistics
count/mean/m2 [neurons] along dim 0); everything else (LayerNorms, row-parallel biases, tau,
scalars) is replicated and taken from rank 0.

Vocabulary padding depends on the TP degree (make-vocab-size-divisible-by x tp). The full state
has the TP=1 padding (what Hugging Face exports expect); splitting for TP=n appends zero rows,
merging trims them. The rows past the TP=1 padding are inert in this model (zero-initialised,
left out of the softmax, never looked up), so padding and trimming them changes nothing.
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, List, Mapping, Optional

import torch

from ..l2e.keys import is_l2e_state_key

VOCAB_KEYS = ("embed_in.weight", "embed_out.weight")
L2E_PARTITIONED = (".count", ".mean", ".m2")


def is_vocab_key(key: str) -> bool:
    return key.endswith(VOCAB_KEYS)


def _meta_state(cfg, tp: int, vocab_size: int) -> Dict[str, torch.Tensor]:
    """name -> meta tensor (with its attributes) of a TP=tp model, rank 0."""
    from ..model.gpt_neox import GPTNeoX
    from ..parallel.state import ParallelState

    ps = ParallelState.layout(tp, 0, device="meta")
    try:
        model = GPTNeoX(cfg, ps, vocab_size=vocab_size, init=False)
    except ImportError:  # the L2E package is not importable: model without inhibitors, L2E keys by name
        model = GPTNeoX(cfg.replace(l2e_enabled=False), ps, vocab_size=vocab_size, init=False)
    out = dict(model.named_buffers())
    out.update(dict(model.named_parameters()))
    return out


def partition_dims(cfg, tp: int, keys, vocab_size: Optional[int] = None) -> Dict[str, Optional[int]]:
    """key -> the dim split across TP ranks (None = replicated) for the model of ``cfg`` at degree ``tp``."""
    vocab_size = vocab_size or cfg.model.vocab_size or cfg.model.make_vocab_size_divisible_by
    full = _meta_state(cfg, 1, vocab_size)
    local = _meta_state(cfg, tp, vocab_size) if tp > 1 else full
    dims = {}
    for k in keys:
        if k in local and hasattr(local[k], "tp_partition_dim"):
            dims[k] = local[k].tp_partition_dim
        elif k in local and k in full and tuple(local[k].shape) != tuple(full[k].shape):
            diff = [d for d, (a, b) in enumerate(zip(local[k].shape, full[k].shape)) if a != b]
            if len(diff) != 1 or local[k].shape[diff[0]] * tp != full[k].shape[diff[0]]:
                raise ValueError(
                    f"{k}: cannot tell how it is split over TP (shapes {tuple(full[k].shape)} "
                    f"at TP=1, {tuple(local[k].shape)} at TP={tp})"
                )
            dims[k] = diff[0]
        elif is_l2e_state_key(k) and k.endswith(L2E_PARTITIONED):
            dims[k] = 0
        else:
            dims[k] = None
    return dims


def _base_rows(cfg, vocab_size: Optional[int], vocab_tensors: List[torch.Tensor]) -> int:
    """Rows of the vocab-parallel weights at TP=1 (the vocab padded to make-vocab-size-divisible-by)."""
    multiple = cfg.model.make_vocab_size_divisible_by
    vocab = vocab_size or cfg.model.vocab_size
    if vocab:
        return int(math.ceil(vocab / multiple) * multiple)
    # vocab size unknown (taken from a tokenizer at run time): the TP padding rows are all zero
    last = 0
    for t in vocab_tensors:
        nz = t.reshape(t.shape[0], -1).ne(0).any(dim=1).nonzero()
        if len(nz):
            last = max(last, int(nz.max()) + 1)
    return max(multiple, int(math.ceil(last / multiple) * multiple))


def _fit_rows(t: torch.Tensor, rows: int, key: str) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    if t.shape[0] > rows:
        extra = t[rows:]
        if extra.count_nonzero().item():
            warnings.warn(
                f"{key}: dropping {t.shape[0] - rows} non-zero vocab padding rows (rows past the "
                f"padded vocab of this layout)",
                stacklevel=2,
            )
        return t[:rows]
    return torch.cat([t, t.new_zeros((rows - t.shape[0],) + tuple(t.shape[1:]))], dim=0)


def merge_tp_states(
    state_dicts_per_rank: List[Mapping[str, torch.Tensor]],
    cfg,
    vocab_size: Optional[int] = None,
    check_replicated: bool = True,
) -> Dict[str, torch.Tensor]:
    """One full (TP=1) state dict from the state dicts of all TP ranks, in TP-rank order."""
    tp = len(state_dicts_per_rank)
    if tp < 1:
        raise ValueError("no state dicts to merge")
    first = state_dicts_per_rank[0]
    for r, sd in enumerate(state_dicts_per_rank[1:], 1):
        if set(sd) != set(first):
            raise ValueError(f"TP rank {r} has different keys than rank 0: {sorted(set(sd) ^ set(first))[:5]}")
    dims = partition_dims(cfg, tp, list(first), vocab_size)
    out = {}
    for k, v in first.items():
        if not torch.is_tensor(v):
            out[k] = v
            continue
        d = dims[k]
        if d is None or tp == 1:
            if check_replicated and tp > 1:
                for r, sd in enumerate(state_dicts_per_rank[1:], 1):
                    if not torch.equal(sd[k], v):
                        warnings.warn(
                            f"{k}: replicated tensor differs between TP rank 0 and {r} "
                            f"(max diff {(sd[k].float() - v.float()).abs().max().item():.3g}); using rank 0",
                            stacklevel=2,
                        )
                        break
            out[k] = v.clone()
        else:
            out[k] = torch.cat([sd[k] for sd in state_dicts_per_rank], dim=d)
    vocab = [out[k] for k in out if is_vocab_key(k) and torch.is_tensor(out[k])]
    if vocab:
        rows = _base_rows(cfg, vocab_size, vocab)
        for k in list(out):
            if is_vocab_key(k) and torch.is_tensor(out[k]):
                out[k] = _fit_rows(out[k], rows, k)
    return out


def split_tp_state(
    full_state: Mapping[str, torch.Tensor], cfg, tp: int, vocab_size: Optional[int] = None
) -> List[Dict[str, torch.Tensor]]:
    """State dicts for the ``tp`` ranks of a TP=tp model from a full (TP=1) state dict."""
    if tp < 1:
        raise ValueError(f"bad TP degree {tp}")
    dims = partition_dims(cfg, tp, list(full_state), vocab_size)
    vocab = [v for k, v in full_state.items() if is_vocab_key(k) and torch.is_tensor(v)]
    rows = None
    if vocab:
        base = _base_rows(cfg, vocab_size, vocab)
        multiple = cfg.model.make_vocab_size_divisible_by * tp
        rows = int(math.ceil(base / multiple) * multiple)
    out: List[Dict[str, torch.Tensor]] = [{} for _ in range(tp)]
    for k, v in full_state.items():
        if not torch.is_tensor(v):
            for sd in out:
                sd[k] = v
            continue
        if rows is not None and is_vocab_key(k):
            v = _fit_rows(v, rows, k)
        d = dims[k]
        if d is None or tp == 1:
            for sd in out:
                sd[k] = v.clone()
            continue
        if v.shape[d] % tp:
            raise ValueError(f"{k}: dim {d} of size {v.shape[d]} does not split over TP={tp}")
        for r, part in enumerate(v.chunk(tp, dim=d)):
            out[r][k] = part.clone()
    return out


def reshard_tp_states(
    state_dicts_per_rank: List[Mapping[str, torch.Tensor]], cfg, tp: int, vocab_size: Optional[int] = None
) -> List[Dict[str, torch.Tensor]]:
    """TP=len(states) -> TP=tp in one call."""
    return split_tp_state(merge_tp_states(state_dicts_per_rank, cfg, vocab_size), cfg, tp, vocab_size)
