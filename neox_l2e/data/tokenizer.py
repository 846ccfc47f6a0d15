"""Tokenizers: SentencePiece models (SPMTokenizer) and Hugging Face tokenizers JSON files (HFTokenizer).

    tok = build_tokenizer("SPMTokenizer", "data/shakespeare/tokenizer/spm8000.model")
    tok.vocab_size, tok.eod, tok.encode(text) -> list[int], tok.decode(ids) -> str

The names follow GPT-NeoX's ``tokenizer-type`` / ``vocab-file`` config keys.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator, Optional

from .errors import DataError


def _first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none."""
    return str(e).splitlines()[0] if str(e) else type(e).__name__


TOKENIZER_TYPES = ("HFTokenizer", "SPMTokenizer")


class SPMTokenizer:
    """A SentencePiece model. ``eod`` is the model's eos id (train_sentencepiece reserves it).

    Text is encoded line by line (lines keep their newline): with the lossless training settings of
    ``train_sentencepiece`` decode(encode(text)) == text, and long documents stay fast.
    """

    def __init__(self, model_file):
        import sentencepiece as spm

        self.path = str(model_file)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=self.path)
        except (OSError, RuntimeError) as e:
            raise DataError(f"{self.path}: not a readable SentencePiece model ({_first_line(e)})") from None
        self.vocab_size = int(self.sp.get_piece_size())
        eod = int(self.sp.eos_id())
        if eod < 0:
            raise DataError(f"{self.path}: the SentencePiece model defines no eos piece to use as end-of-document")
        self.eod = eod

    def encode(self, text: str) -> list[int]:
        lines = text.splitlines(keepends=True)
        # one batched call has a fixed cost that only pays off for long documents
        pieces = self.sp.encode(lines, num_threads=1) if len(lines) >= 256 else [self.sp.encode(l) for l in lines]
        ids: list[int] = []
        for line_ids in pieces:
            ids.extend(line_ids)
        return ids

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])


class HFTokenizer:
    """A Hugging Face ``tokenizers`` JSON file (e.g. Pythia's 20B tokenizer). ``eod`` is <|endoftext|>
    (as in GPT-NeoX), else </s> or <eos> when the file has no <|endoftext|>."""

    EOD_TOKENS = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")

    def __init__(self, json_file):
        from tokenizers import Tokenizer

        self.path = str(json_file)
        try:
            self.tok = Tokenizer.from_file(self.path)
        except Exception as e:  # noqa: BLE001 - tokenizers raises its own Exception types
            raise DataError(f"{self.path}: not a readable tokenizers JSON file ({_first_line(e)})") from None
        self.vocab_size = int(self.tok.get_vocab_size(with_added_tokens=True))
        for name in self.EOD_TOKENS:
            eod = self.tok.token_to_id(name)
            if eod is not None:
                self.eod = int(eod)
                break
        else:
            raise DataError(f"{self.path}: no end-of-document token (looked for {', '.join(self.EOD_TOKENS)})")

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


def build_tokenizer(tokenizer_type: str, vocab_file):
    """The tokenizer of NeoX's ``tokenizer-type`` (HFTokenizer | SPMTokenizer) from ``vocab-file``."""
    if tokenizer_type not in TOKENIZER_TYPES:
        raise DataError(
            f"{vocab_file}: unsupported tokenizer-type {tokenizer_type!r} (use one of {', '.join(TOKENIZER_TYPES)})"
        )
    if not vocab_file:
        raise DataError(f"tokenizer-type {tokenizer_type} needs a vocab-file (none given)")
    if not os.path.isfile(vocab_file):
        raise DataError(f"{vocab_file}: tokenizer file not found")
    return SPMTokenizer(vocab_file) if tokenizer_type == "SPMTokenizer" else HFTokenizer(vocab_file)


def infer_tokenizer_type(vocab_file) -> str:
    """HFTokenizer for a .json file, SPMTokenizer otherwise."""
    return "HFTokenizer" if str(vocab_file).endswith(".json") else "SPMTokenizer"


def _lines(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        for line in text.splitlines():
            if line.strip():
                yield line


def train_sentencepiece(
    texts: Iterable[str],
    model_prefix,
    vocab_size: int = 8000,
    model_type: str = "bpe",
    num_threads: Optional[int] = None,
    quiet: bool = True,
) -> str:
    """Train a lossless SentencePiece model on ``texts`` (one sentence per line); returns MODEL_PREFIX.model.

    Settings for a lossless round trip: identity normalisation, no whitespace collapsing, no dummy
    prefix, byte fallback (any character encodes), whitespace-only pieces (indentation). Special ids:
    pad 0 (unused), unk 1, bos 2 (unused), eos 3 = end-of-document. The files are written under a
    temporary name and renamed, so a failure leaves nothing behind.
    """
    import sentencepiece as spm

    model_prefix = Path(model_prefix)
    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp = model_prefix.with_name(f"{model_prefix.name}.tmp-{os.getpid()}")
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_lines(texts),
            model_prefix=str(tmp),
            vocab_size=vocab_size,
            model_type=model_type,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            byte_fallback=True,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            character_coverage=1.0,
            pad_id=0,
            unk_id=1,
            bos_id=2,
            eos_id=3,
            max_sentence_length=1 << 16,
            num_threads=num_threads or max(1, os.cpu_count() or 1),
            minloglevel=2 if quiet else 0,
        )
        for ext in (".model", ".vocab"):
            os.replace(f"{tmp}{ext}", f"{model_prefix}{ext}")
    except RuntimeError as e:
        raise DataError(f"{model_prefix}.model: SentencePiece training failed ({str(e).splitlines()[0]})") from None
    finally:
        for ext in (".model", ".vocab"):
            if os.path.exists(f"{tmp}{ext}"):
                os.remove(f"{tmp}{ext}")
    return f"{model_prefix}.model"
