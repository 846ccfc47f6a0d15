"""Hugging Face GPTNeoX interchange: import a HF checkpoint directory, export ours to one.

Our parameter names are HF's (gpt_neox.embed_in, gpt_neox.layers.N.attention.query_key_value, ...),
so the conversion is a config translation plus dropping our non-weight state (L2E buffers).
Weights are read through safetensors where present, and ``torch.load(weights_only=True)`` otherwise:
a checkpoint from elsewhere never runs code. No network access.
"""

from __future__ import annotations

import errno
import json
import math
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from ..config import ConfigError, NeoXConfig
from ..errors import InteropError
from ..l2e.keys import is_l2e_state_key

WEIGHT_SUFFIXES = (".weight", ".bias")

# ---------------------------------------------------------------------------------------------
# config translation


def hf_config_from_neox(cfg: NeoXConfig, vocab_size: int) -> dict:
    """config.json for transformers' GPTNeoXForCausalLM, saying which GELU was used."""
    m = cfg.model
    return {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "vocab_size": vocab_size,
        "hidden_size": m.hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "intermediate_size": cfg.ffn_size,
        # tanh GELU (NeoX bias-gelu-fusion) is torch's gelu(approximate="tanh") = HF "gelu_pytorch_tanh"
        "hidden_act": "gelu_pytorch_tanh" if cfg.gelu_approximate == "tanh" else "gelu",
        "max_position_embeddings": m.max_position_embeddings or m.seq_length,
        "layer_norm_eps": m.layernorm_epsilon,
        "use_parallel_residual": m.gpt_j_residual,
        "tie_word_embeddings": not m.no_weight_tying,
        "attention_bias": m.use_bias_in_attn_linear,
        "attention_dropout": m.attention_dropout,
        "hidden_dropout": m.hidden_dropout,
        "initializer_range": m.init_method_std,
        # transformers >= 5 reads rope_parameters; older versions read rotary_pct / rotary_emb_base
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": float(m.rotary_emb_base),
            "partial_rotary_factor": m.rotary_pct,
        },
        "rotary_pct": m.rotary_pct,
        "rotary_emb_base": m.rotary_emb_base,
        # Pythia's <|endoftext|>; write_hf_dir replaces them with the run tokenizer's ids (tokenizer_special_ids)
        "bos_token_id": 0,
        "eos_token_id": 0,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def neox_keys_from_hf(hf: dict, source: str = "config.json") -> dict:
    """NeoX config keys (underscore form) describing the model of a HF GPTNeoX config.json."""

    def need(key):
        if key not in hf:
            raise InteropError(f"{source}: missing '{key}'; is this a GPTNeoX config.json?")
        return hf[key]

    if hf.get("model_type", "gpt_neox") != "gpt_neox":
        raise InteropError(f"{source}: model_type is {hf.get('model_type')!r}, expected 'gpt_neox'")
    rope_key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    rope = hf.get(rope_key) or {}
    if not isinstance(rope, dict):
        raise InteropError(
            f"{source}: '{rope_key}' is {type(rope).__name__} {str(rope)[:40]!r}, expected an object "
            "(rope_theta, partial_rotary_factor); fix config.json"
        )
    rotary_pct = hf.get("rotary_pct", rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
    base = hf.get("rotary_emb_base", rope.get("rope_theta", hf.get("rope_theta", 10000)))
    act = hf.get("hidden_act", "gelu")
    if act in ("gelu", "gelu_python"):
        tanh = False
    elif act in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        tanh = True
    else:
        raise InteropError(f"{source}: hidden_act {act!r} is not a GELU this project implements")
    for key in _SIZE_KEYS:
        if hf.get(key) is not None:
            _check_size(hf[key], key, source)
    try:
        return _model_keys(hf, need, rotary_pct, base, tanh)
    except (TypeError, ValueError, OverflowError) as e:
        raise InteropError(f"{source}: a value has the wrong type ({e}); is this a GPTNeoX config.json?") from None


_SIZE_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
)


def _check_size(value, key: str, source: str) -> None:
    """InteropError naming ``key`` unless ``value`` is a positive whole number (1024 or 1024.0; not true,
    Infinity, NaN, 1.5, -5 or a string)."""
    whole = isinstance(value, int) and not isinstance(value, bool)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        whole = True
    if not whole or value < 1:
        raise InteropError(f"{source}: '{key}' is {value!r}; it must be a positive whole number (fix config.json)")


def _rope_base(base) -> float:
    """rope_theta as it is: an int when it is integral (10000.0 -> 10000), the float otherwise (never truncated)."""
    b = float(base)
    return int(b) if b.is_integer() else b


def _model_keys(hf: dict, need, rotary_pct, base, tanh: bool) -> dict:
    vocab = int(need("vocab_size"))
    hidden = int(need("hidden_size"))
    return {
        "num_layers": int(need("num_hidden_layers")),
        "hidden_size": hidden,
        "num_attention_heads": int(need("num_attention_heads")),
        "intermediate_size": int(hf.get("intermediate_size") or 4 * hidden),
        "vocab_size": vocab,
        "make_vocab_size_divisible_by": 1,  # the HF vocab is already padded: keep it as it is
        "max_position_embeddings": int(hf.get("max_position_embeddings", 2048)),
        "seq_length": min(2048, int(hf.get("max_position_embeddings", 2048))),
        "rotary_pct": float(rotary_pct),
        "rotary_emb_base": _rope_base(base),
        "gpt_j_residual": bool(hf.get("use_parallel_residual", True)),
        "no_weight_tying": not bool(hf.get("tie_word_embeddings", False)),
        "layernorm_epsilon": float(hf.get("layer_norm_eps", 1e-5)),
        "bias_gelu_fusion": tanh,
        "use_bias_in_attn_linear": bool(hf.get("attention_bias", True)),
        "attention_dropout": float(hf.get("attention_dropout", 0.0) or 0.0),
        "hidden_dropout": float(hf.get("hidden_dropout", 0.0) or 0.0),
    }


# ---------------------------------------------------------------------------------------------
# reading a HF directory


def read_hf_dir(path) -> tuple:
    """(config dict, state dict) of a HF GPTNeoX checkpoint directory, with clear errors."""
    path = Path(path)
    if not path.is_dir():
        raise InteropError(f"{path}: not a directory (expected a Hugging Face model folder with config.json)")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise InteropError(f"{path}: no config.json; not a Hugging Face model folder")
    try:
        hf = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise InteropError(f"{cfg_file}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(hf, dict):
        raise InteropError(f"{cfg_file}: expected a JSON object of config keys, got {type(hf).__name__}")
    return hf, _read_weights(path)


def _read_weights(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = []
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError):
                raise InteropError(f"{index}: not a valid shard index (no weight_map)") from None
            files = [path / f for f in sorted(set(weight_map.values()))]
            break
    if not files:
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise InteropError(f"{path}: no weights found (model.safetensors or pytorch_model.bin)")
    state = {}
    for f in files:
        if not f.is_file():
            raise InteropError(f"{f}: weight shard listed in the index is missing")
        try:
            if f.suffix == ".safetensors":
                part = load_file(str(f))
            else:
                part = torch.load(f, map_location="cpu", weights_only=True)
        except (SafetensorError, OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
            raise InteropError(f"{f}: cannot read weights ({str(e).splitlines()[0][:200]})") from None
        if not isinstance(part, dict):
            raise InteropError(f"{f}: expected a dict of tensors")
        state.update(part)
    return state


def hf_state_to_ours(hf_state: dict, expected: dict, source: str) -> dict:
    """Keep the weights our model expects (names are shared); check every one is present with the right shape."""
    out = {}
    for name, shape in expected.items():
        if name not in hf_state:
            raise InteropError(f"{source}: weight '{name}' is missing (incomplete or not a GPTNeoX checkpoint)")
        t = hf_state[name]
        if tuple(t.shape) != tuple(shape):
            raise InteropError(
                f"{source}: weight '{name}' has shape {tuple(t.shape)}, the config implies {tuple(shape)}"
            )
        out[name] = t
    return out


def our_state_to_hf(state: dict) -> dict:
    """Our full (unsharded) state dict -> HF names: only the weights (L2E buffers and the like are dropped)."""
    return {k: v.contiguous() for k, v in state.items() if k.endswith(WEIGHT_SUFFIXES) and not is_l2e_state_key(k)}


# ---------------------------------------------------------------------------------------------
# directory writers


EXPORT_RECORD = ".neox-l2e-export"  # the names of the files an export wrote (what --overwrite may replace)
EXPORT_FILES = {
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    EXPORT_RECORD,
}


def check_export_dir(out_dir, overwrite: bool = False, protect: Iterable = ()) -> Path:
    """Refuse (one InteropError line) an output folder that is a file, that is / is inside / holds a folder in
    ``protect`` (the checkpoint exported), or that is not empty without ``overwrite``; with it, one that holds
    files an export did not write (--overwrite replaces a previous export only)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InteropError(f"{out_dir}: exists and is a file; choose a folder name for the export")
    b = out_dir.resolve()
    for src in protect:
        a = Path(src).resolve()
        if a == b or a in b.parents or b in a.parents:
            raise InteropError(f"{out_dir}: is the source {src}, inside it, or holds it; export to a separate folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise InteropError(f"{out_dir}: exists and is not empty; pass --overwrite or choose another folder")
        ours = set(EXPORT_FILES)
        try:
            ours |= set((out_dir / EXPORT_RECORD).read_text().split())
        except OSError:
            pass
        foreign = sorted(
            p.name + ("/" if p.is_dir() else "") for p in out_dir.iterdir() if p.name not in ours or not p.is_file()
        )
        if foreign:
            raise InteropError(
                f"{out_dir}: --overwrite replaces only a previous export, and this folder holds other "
                f"files ({', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}); move them away "
                "or choose another folder"
            )
    return out_dir


def _new_export_dir(out_dir: Path) -> Path:
    """A temporary sibling of out_dir (same filesystem) with the permissions the user's umask gives a new folder."""
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InteropError(f"{out_dir.parent}: cannot create the folder ({e.strerror or e})") from None
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-export-{out_dir.name}-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def _publish_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished export into place: the previous export (checked by check_export_dir) is moved aside,
    tmp renamed to out_dir, then the old one deleted. When a rename crosses filesystems (EXDEV, e.g. out_dir is
    a mount point), the files are copied into out_dir instead."""
    (tmp / EXPORT_RECORD).write_text("\n".join(sorted(p.name for p in tmp.iterdir())) + "\n")
    old = None
    try:
        if out_dir.exists():
            old = out_dir.parent / f".old-export-{out_dir.name}-{os.getpid()}"
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    except OSError as e:
        if old is not None and not out_dir.exists():
            os.replace(old, out_dir)
        if e.errno not in (errno.EXDEV, errno.EBUSY):
            raise InteropError(f"{out_dir}: cannot move the export into place ({e.strerror or e})") from None
        out_dir.mkdir(exist_ok=True)
        for p in out_dir.iterdir():  # only files of a previous export (check_export_dir)
            p.unlink()
        for p in tmp.iterdir():
            shutil.copy2(p, out_dir / p.name)
        return
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_hf_dir(
    out_dir,
    cfg: NeoXConfig,
    full_state: dict,
    vocab_size: int,
    tokenizer_files: Iterable = (),
    dtype: Optional[torch.dtype] = None,
    overwrite: bool = False,
    protect: Iterable = (),
) -> Path:
    """Write a folder transformers loads with GPTNeoXForCausalLM.from_pretrained (atomic: a temporary sibling, then
    a rename). ``overwrite`` replaces a previous export only; ``protect``: folders the output may not touch."""
    from safetensors.torch import save_file

    out_dir = check_export_dir(out_dir, overwrite, protect)
    tmp = _new_export_dir(out_dir)
    try:
        weights = our_state_to_hf(full_state)
        if dtype is not None:
            weights = {k: v.to(dtype) for k, v in weights.items()}
        if not (not cfg.model.no_weight_tying) and "embed_out.weight" not in weights:
            raise InteropError("export: embed_out.weight missing from an untied model")
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in weights.items()},
            str(tmp / "model.safetensors"),
            metadata={"format": "pt"},
        )
        hf = hf_config_from_neox(cfg, vocab_size)
        hf.update(tokenizer_special_ids(tokenizer_files))
        if dtype is not None:
            hf["torch_dtype"] = str(dtype).replace("torch.", "")
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        for f in tokenizer_files:
            f = Path(f)
            if f.is_file():
                _write_tokenizer(f, tmp)
        _publish_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def tokenizer_special_ids(tokenizer_files: Iterable) -> dict:
    """config.json's bos/eos ids from the run's tokenizer: its end-of-document token for both (as Pythia's
    <|endoftext|>, which GPT-NeoX puts between documents): a tokenizers JSON's <|endoftext|> (else </s>, <eos>),
    a SentencePiece model's eos piece. Empty when no tokenizer file is found (config.json keeps Pythia's 0)."""
    from ..data.tokenizer import build_tokenizer, infer_tokenizer_type

    for f in tokenizer_files:
        f = Path(f)
        if f.is_file():
            tok = build_tokenizer(infer_tokenizer_type(str(f)), str(f))
            return {"bos_token_id": int(tok.eod), "eos_token_id": int(tok.eod)}
    return {}


def _write_tokenizer(src: Path, out_dir: Path) -> None:
    """Write the run's tokenizer so AutoTokenizer (and lm-eval's hf model) loads it with the run's ids, and copy
    the file itself. A tokenizers JSON (Pythia's kind) is written as tokenizer.json + tokenizer_config.json
    (PreTrainedTokenizerFast, end-of-document token as eos and bos, as Pythia's). A SentencePiece BPE model is
    rebuilt as a tokenizers BPE (``spm_to_hf_tokenizer``) and written the same way once it encodes a check text
    to the same ids as SentencePiece; when it cannot be (other settings, ids differ) only the .model is copied
    and a warning says that the export has no tokenizer transformers loads."""
    shutil.copy2(src, out_dir / src.name)
    if src.suffix == ".json":
        from ..data.tokenizer import HFTokenizer

        tok = HFTokenizer(src)
        eod = tok.tok.id_to_token(tok.eod)
        _save_fast_tokenizer(tok.tok, out_dir, eod, eod)
        return
    import warnings

    try:
        hf_tok, eod_piece, unk_piece = spm_to_hf_tokenizer(src)
    except InteropError as e:
        warnings.warn(
            f"{src}: the export has no tokenizer transformers loads ({e}); evaluate it with "
            "tools/evaluate.py --backend adapter",
            stacklevel=2,
        )
        return
    _save_fast_tokenizer(hf_tok, out_dir, eod_piece, unk_piece)


def _save_fast_tokenizer(tok, out_dir: Path, eod_piece: str, unk_piece: str) -> None:
    """tokenizer.json + tokenizer_config.json of a PreTrainedTokenizerFast whose bos and eos are the
    end-of-document piece (no token added around the text)."""
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=eod_piece, bos_token=eod_piece, unk_token=unk_piece
    ).save_pretrained(str(out_dir))


# a check text for the SentencePiece conversion: spaces and runs of spaces, tabs, newlines (CRLF too), accents,
# CJK and emoji (byte fallback), digits, a control character
SPM_CHECK_TEXT = (
    "The quick brown fox, 1234 -- naïve café.\n\n    indented  two  spaces\tand a tab\r\n"
    "你好世界 🙂 Ünïcödé\x00end. ROMEO: O, she doth teach the torches to burn bright!\n"
)


def spm_to_hf_tokenizer(model_file, check_texts: Sequence[str] = (SPM_CHECK_TEXT,)) -> tuple:
    """(tokenizers.Tokenizer, end-of-document piece, unknown piece) encoding like the SentencePiece BPE model
    ``model_file`` as the project uses it (``SPMTokenizer``: no special tokens added). Supported: BPE models
    without a normaliser
    (identity rule, no extra-whitespace removal) and without a dummy prefix, with or without byte fallback: the
    settings of ``train_sentencepiece``. The BPE merges are the pairs of normal pieces that make a normal
    piece, ranked by that piece's score (SentencePiece merges the best-scoring piece first). The result is
    checked on ``check_texts`` (and the pieces of the vocabulary): any id that differs is an InteropError."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError:  # protobuf missing
        raise InteropError("reading a SentencePiece model's settings needs the protobuf package") from None
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    from ..data.tokenizer import SPMTokenizer

    proto = pb.ModelProto()
    try:
        proto.ParseFromString(Path(model_file).read_bytes())
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError
        raise InteropError(f"not a SentencePiece model ({e})") from None
    ts, ns = proto.trainer_spec, proto.normalizer_spec
    unsupported = [
        what
        for what, bad in (
            ("a unigram/char/word model (only BPE converts)", ts.model_type != pb.TrainerSpec.BPE),
            (f"normalisation rule {ns.name!r}", bool(ns.precompiled_charsmap)),
            ("add_dummy_prefix", ns.add_dummy_prefix),
            ("remove_extra_whitespaces", ns.remove_extra_whitespaces),
            ("no whitespace escaping", not ns.escape_whitespaces),
        )
        if bad
    ]
    if unsupported:
        raise InteropError("SentencePiece settings without a tokenizers equivalent here: " + ", ".join(unsupported))
    Piece = pb.ModelProto.SentencePiece
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    normal = {p.piece: (p.score, i) for i, p in enumerate(proto.pieces) if p.type == Piece.NORMAL}
    ranked = sorted(
        (-score, i, tok[:k], tok[k:])
        for tok, (score, i) in normal.items()
        for k in range(1, len(tok))
        if tok[:k] in normal and tok[k:] in normal
    )
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=[(a, b) for _, _, a, b in ranked],
            unk_token=ts.unk_piece,
            fuse_unk=True,
            byte_fallback=ts.byte_fallback,
        )
    )
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    steps = [decoders.Replace("\u2581", " ")] + ([decoders.ByteFallback()] if ts.byte_fallback else [])
    steps.append(decoders.Fuse())
    tok.decoder = decoders.Sequence(steps)
    user = [AddedToken(p.piece, normalized=True, special=False) for p in proto.pieces if p.type == Piece.USER_DEFINED]
    if user:
        tok.add_tokens(user)
    spm_tok = SPMTokenizer(model_file)
    pieces = "".join(p.piece.replace("\u2581", " ") for p in proto.pieces if p.type == Piece.NORMAL)
    for text in list(check_texts) + [pieces]:
        want, got = spm_tok.encode(text), tok.encode(text, add_special_tokens=False).ids
        if want != got:
            at = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
            raise InteropError(f"the tokenizers rebuild encodes differently from SentencePiece (token {at})")
    return tok, proto.pieces[spm_tok.eod].piece, ts.unk_piece


def load_hf_into_model(hf_dir, cfg_overrides: Optional[dict] = None, ps=None):
    """Build our model from a HF GPTNeoX folder (weights loaded). Returns (model, cfg)."""
    from ..config import build_config
    from ..model import GPTNeoX
    from ..parallel import ParallelState

    hf, state = read_hf_dir(hf_dir)
    keys = neox_keys_from_hf(hf, str(Path(hf_dir) / "config.json"))
    keys.update(cfg_overrides or {})
    try:
        cfg = build_config(keys, {k: str(Path(hf_dir) / "config.json") for k in keys})
    except ConfigError as e:
        raise InteropError(str(e)) from None
    ps = ps or ParallelState.single()
    model = GPTNeoX(cfg, ps, init=False)
    expected = {
        k: v.shape for k, v in model.state_dict().items() if k.endswith(WEIGHT_SUFFIXES) and not is_l2e_state_key(k)
    }
    if ps.tp > 1:
        raise InteropError("load_hf_into_model builds a TP=1 model; re-split with the checkpoint tools for TP > 1")
    weights = hf_state_to_ours(state, expected, str(hf_dir))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected, unexpected
    return model, cfg
