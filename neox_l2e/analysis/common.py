"""Shared bits: the error type, device choice, a uniform tokenizer interface."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import torch

from ..errors import AnalysisError


def pick_device(name: Optional[str] = None) -> torch.device:
    """'auto' (or None): the GPU when there is one, else the CPU."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise AnalysisError(f"--device {name!r}: {e}") from None


def parse_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    table = {
        None: None,
        "": None,
        "auto": None,
        "fp32": torch.float32,
        "float32": torch.float32,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
    }
    if name not in table:
        raise AnalysisError(f"unknown dtype {name!r}; use fp32, bf16 or fp16")
    return table[name]


def offline_env() -> None:
    """No hub access from any analysis tool."""
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(k, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class Tokenizer:
    """The interface the analysis code uses: encode(text) -> ids, decode(ids) -> text, eod, vocab_size."""

    def __init__(self, encode, decode, eod: int, vocab_size: int, name: str):
        self._encode, self._decode = encode, decode
        self.eod, self.vocab_size, self.name = int(eod), int(vocab_size), name

    def encode(self, text: str) -> List[int]:
        return list(self._encode(text))

    def decode(self, ids) -> str:
        return self._decode([int(i) for i in ids])

    @classmethod
    def wrap(cls, tok, name: str = "tokenizer") -> "Tokenizer":
        """Wrap a project tokenizer (neox_l2e.data), a ``tokenizers.Tokenizer`` or a transformers tokenizer."""
        if isinstance(tok, Tokenizer):
            return tok
        try:
            import tokenizers

            if isinstance(tok, tokenizers.Tokenizer):
                eod = _hf_eod(tok.token_to_id)
                return cls(
                    lambda t: tok.encode(t, add_special_tokens=False).ids, tok.decode, eod, tok.get_vocab_size(), name
                )
        except ImportError:  # pragma: no cover
            pass
        if hasattr(tok, "convert_tokens_to_ids") and callable(tok) and hasattr(tok, "eos_token_id"):
            eod = tok.eos_token_id if tok.eos_token_id is not None else 0
            return cls(lambda t: tok(t, add_special_tokens=False)["input_ids"], tok.decode, eod, len(tok), name)
        if hasattr(tok, "encode") and hasattr(tok, "decode"):
            eod = getattr(tok, "eod", getattr(tok, "eod_id", 0))
            return cls(tok.encode, tok.decode, eod, getattr(tok, "vocab_size", 0), name)
        raise AnalysisError(f"{name}: not a tokenizer this tool understands ({type(tok).__name__})")


def _hf_eod(token_to_id) -> int:
    for t in ("<|endoftext|>", "</s>", "<eos>", "<eod>", "[EOS]"):
        i = token_to_id(t)
        if i is not None:
            return i
    return 0


def load_tokenizer(path, tokenizer_type: Optional[str] = None) -> Tokenizer:
    """A tokenizer from a file or folder: SentencePiece ``.model``, tokenizers ``.json``, or a HF folder."""
    p = Path(path)
    if not p.exists():
        raise AnalysisError(f"{p}: tokenizer file not found")
    if p.is_dir():
        if (p / "tokenizer.json").is_file():
            return load_tokenizer(p / "tokenizer.json")
        models = sorted(p.glob("*.model"))
        if models:
            return load_tokenizer(models[0])
        raise AnalysisError(f"{p}: no tokenizer.json or SentencePiece .model in this folder")
    kind = tokenizer_type or ("SPMTokenizer" if p.suffix == ".model" else "HFTokenizer")
    try:  # the project's tokenizers (neox_l2e.data), when that package provides them
        from ..data import build_tokenizer  # type: ignore
    except ImportError:
        build_tokenizer = None
    if build_tokenizer is not None:
        try:
            return Tokenizer.wrap(build_tokenizer(kind, str(p)), p.name)
        except (OSError, RuntimeError, ValueError) as e:
            raise AnalysisError(f"{p}: cannot load {kind} ({str(e).splitlines()[0][:200]})") from None
    try:
        if kind == "SPMTokenizer":
            import sentencepiece as spm

            sp = spm.SentencePieceProcessor(model_file=str(p))
            eod = sp.eos_id() if sp.eos_id() >= 0 else 0
            return Tokenizer(sp.encode, sp.decode, eod, sp.get_piece_size(), p.name)
        import tokenizers

        return Tokenizer.wrap(tokenizers.Tokenizer.from_file(str(p)), p.name)
    except (OSError, RuntimeError, ValueError, Exception) as e:  # sentencepiece/tokenizers raise various types
        raise AnalysisError(f"{p}: cannot load {kind} ({str(e).splitlines()[0][:200]})") from None
