"""The default Shakespeare corpus: split by play (both editions together), prepared once, lossless."""

import os

import numpy as np

from neox_l2e.data import MMapIndexedDataset, build_tokenizer, prepare_default_corpus
from neox_l2e.data.corpus import VALID_PLAYS, play_of, shakespeare_texts_dir, split_by_play


def test_both_editions_of_a_play_on_the_same_side():
    files = sorted(shakespeare_texts_dir().glob("*_gut*.txt"))
    folio = [f for f in files if f.stem.endswith("_gut_f")]
    modern = {play_of(f) for f in files if not f.stem.endswith("_gut_f")}
    assert len(folio) >= 30
    # every First Folio text has its modern edition under the same play key
    assert [f.name for f in folio if play_of(f) not in modern] == []
    train, valid = split_by_play(files)
    assert set(train).isdisjoint(valid) and len(train) + len(valid) == len(files)
    assert {play_of(f) for f in train}.isdisjoint({play_of(f) for f in valid})
    assert {play_of(f) for f in valid} == set(VALID_PLAYS)
    assert len(valid) == 2 * len(VALID_PLAYS)  # both editions of each held-out play


def test_prepared_once_then_reused(corpus, capsys):
    for key in ("train_prefix", "valid_prefix"):
        assert os.path.isfile(corpus[key] + ".bin") and os.path.isfile(corpus[key] + ".idx")
    stamps = {p: os.stat(p).st_mtime_ns for p in (corpus["tokenizer"], corpus["train_prefix"] + ".bin")}
    root = os.path.dirname(corpus["train_prefix"])
    again = prepare_default_corpus(root=root, vocab_size=2000)
    assert again == corpus
    assert "reusing" in capsys.readouterr().out
    assert stamps == {p: os.stat(p).st_mtime_ns for p in stamps}


def test_corpus_documents_decode_to_the_plays(corpus):
    tok = build_tokenizer("SPMTokenizer", corpus["tokenizer"])
    _, valid_files = split_by_play(shakespeare_texts_dir().glob("*_gut*.txt"))
    valid = MMapIndexedDataset(corpus["valid_prefix"])
    assert valid.dtype == np.uint16 and len(valid) == len(valid_files)
    for i, f in enumerate(valid_files):
        ids = valid[i].tolist()
        assert ids[-1] == tok.eod
        assert tok.decode(ids[:-1]) == f.read_text(encoding="utf-8").replace("\r\n", "\n")
    train = MMapIndexedDataset(corpus["train_prefix"])
    assert len(train) > 60 and train.num_tokens > 5 * valid.num_tokens
    assert int(train.tokens.max()) < tok.vocab_size
