"""Load a model for analysis from our checkpoint folder or a Hugging Face GPTNeoX / Pythia folder.

Layouts recognised (``detect_layout``):
    hf      a folder with config.json and model.safetensors / pytorch_model*.bin (+ an index for shards)
    neox    our checkpoint folder: ``latest`` + ``global_step*/mp_rank_XX_model_states.pt`` (any TP degree;
            the TP shards are merged), or one ``global_step*`` folder itself
The model is built at TP=1 with L2E switched off (the weights are what L2E trained; the analysis wants the
plain forward), in eval mode, on the requested device and dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..l2e.keys import is_l2e_state_key
from .common import AnalysisError, Tokenizer, load_tokenizer


@dataclass
class LoadedModel:
    model: torch.nn.Module
    cfg: object
    tokenizer: Optional[Tokenizer]
    name: str
    path: str
    layout: str
    num_parameters: int
    info: dict = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.model.gpt_neox.layers)

    @property
    def ffn_size(self) -> int:
        return self.cfg.ffn_size


def detect_layout(path) -> str:
    p = Path(path)
    if not p.exists():
        raise AnalysisError(f"{p}: checkpoint not found")
    if p.is_dir() and (p / "config.json").is_file():
        return "hf"
    if p.is_dir() and (
        (p / "latest").is_file()
        or any(p.glob("mp_rank_*_model_states.pt"))
        or any(p.glob("global_step*/mp_rank_*_model_states.pt"))
    ):
        return "neox"
    raise AnalysisError(
        f"{p}: unknown checkpoint layout (expected a Hugging Face folder with config.json, "
        "or a neox-l2e checkpoint folder with 'latest' and global_step*/)"
    )


def _neox_states(p: Path, tag: Optional[str]):
    from ..checkpoint import CheckpointError, read_model_states

    if any(p.glob("mp_rank_*_model_states.pt")) and not (p / "latest").is_file():
        p, tag = p.parent, p.name  # a global_step folder itself
    if tag is None and not (p / "latest").is_file():
        tags = sorted(
            p.glob("global_step*"),
            key=lambda q: int(q.name[len("global_step") :] or 0) if q.name[len("global_step") :].isdigit() else -1,
        )
        if not tags:
            raise AnalysisError(f"{p}: no 'latest' file and no global_step* folder")
        tag = tags[-1].name
    try:
        return read_model_states(p, tag)
    except (CheckpointError, OSError, RuntimeError) as e:
        raise AnalysisError(str(e).splitlines()[0]) from None


def load_neox_checkpoint(path, tag: Optional[str] = None, device="cpu", dtype=None):
    """(model, cfg) from our checkpoint folder (TP shards merged; L2E off; eval mode)."""
    from ..checkpoint.tp_states import merge_tp_states
    from ..config import ConfigError, config_from_checkpoint_dict
    from ..model import GPTNeoX
    from ..parallel import ParallelState

    p = Path(path)
    cfg_dict, states, _client = _neox_states(p, tag)
    try:
        cfg = config_from_checkpoint_dict(cfg_dict)
    except ConfigError as e:
        raise AnalysisError(f"{p}: the config saved in the checkpoint does not load ({e})") from None
    full = merge_tp_states(states, cfg) if len(states) > 1 else dict(states[0])
    if "gpt_neox.embed_in.weight" not in full:
        raise AnalysisError(f"{p}: the checkpoint has no gpt_neox.embed_in.weight; not a GPTNeoX model")
    rows = full["gpt_neox.embed_in.weight"].shape[0]
    try:
        cfg1 = cfg.replace(
            model_parallel_size=1,
            l2e_enabled=False,
            make_vocab_size_divisible_by=1,
            vocab_size=rows,
            checkpoint_activations=False,
        )
    except ConfigError as e:
        raise AnalysisError(f"{p}: {e}") from None
    model = GPTNeoX(cfg1, ParallelState.single(), vocab_size=rows, init=False)
    weights = {k: v for k, v in full.items() if not is_l2e_state_key(k) and torch.is_tensor(v)}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if k.endswith((".weight", ".bias"))]
    if missing or unexpected:
        raise AnalysisError(
            f"{p}: checkpoint does not match its config (missing {missing[:3]}, unexpected {list(unexpected)[:3]})"
        )
    return model, cfg


def load_model(
    path,
    device="cpu",
    dtype: Optional[torch.dtype] = None,
    tokenizer: Optional[str] = None,
    tag: Optional[str] = None,
    name: Optional[str] = None,
    need_tokenizer: bool = True,
) -> LoadedModel:
    """Load a checkpoint (either layout) and its tokenizer. ``tokenizer`` (a file or folder) overrides the one
    the checkpoint names. Raises AnalysisError with one line on any user-facing problem."""
    from ..interop.hf import InteropError, load_hf_into_model

    p = Path(path)
    layout = detect_layout(p)
    if layout == "hf":
        try:
            model, cfg = load_hf_into_model(p)
        except InteropError as e:
            raise AnalysisError(str(e)) from None
        tok_src = tokenizer or (p if ((p / "tokenizer.json").is_file() or any(p.glob("*.model"))) else None)
    else:
        model, cfg = load_neox_checkpoint(p, tag)
        tok_src = tokenizer or cfg.data.vocab_file
    tok = None
    if tok_src is not None:
        tok_type = None if tokenizer else (cfg.data.tokenizer_type if layout == "neox" else None)
        if layout == "neox" and not tokenizer and not Path(tok_src).exists():
            raise AnalysisError(
                f"{p}: its tokenizer {tok_src} is not there (run from the training folder, or pass --tokenizer)"
            )
        tok = load_tokenizer(tok_src, tok_type)
    elif need_tokenizer:
        raise AnalysisError(f"{p}: no tokenizer found with the checkpoint; pass --tokenizer FILE")
    model = model.to(device=device, dtype=dtype).eval()
    return LoadedModel(
        model=model,
        cfg=cfg,
        tokenizer=tok,
        name=name or _default_name(p),
        path=str(p),
        layout=layout,
        num_parameters=model.num_parameters(),
    )


def _default_name(p: Path) -> str:
    p = p.resolve()
    if p.name in ("checkpoints", "hf") or p.name.startswith("global_step"):
        return p.parent.name if not p.name.startswith("global_step") else f"{p.parent.name}@{p.name}"
    return p.name
