"""Bad inputs give one clear DataError line naming the file and the problem, before training starts."""

import builtins
import errno
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from neox_l2e.data import DataError, MMapIndexedDataset, build_datasets, build_tokenizer, write_indexed_dataset

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def good(tmp_path):
    return write_indexed_dataset(
        str(tmp_path / "good"), [[1, 2, 3, 0], [4, 5, 0], [6, 7, 8, 9, 0]] * 10, vocab_size=100
    )


def patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def truncate(path, drop):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - drop)


def raises_one_line(prefix_or_cfg, pattern, data_config=None):
    """The error from opening the dataset directly and through build_datasets (the training path)."""
    with pytest.raises(DataError, match=pattern) as e:
        MMapIndexedDataset(prefix_or_cfg)
    msg = str(e.value)
    assert "\n" not in msg and isinstance(e.value, ValueError)
    if data_config is not None:
        with pytest.raises(DataError, match=pattern):
            build_datasets(data_config(train_data_paths=[prefix_or_cfg]), 4, 1, {"train": 4})
    return msg


def test_missing_files(good, data_config):
    os.remove(good + ".bin")
    msg = raises_one_line(good, r"good\.bin: token file not found", data_config)
    assert msg.startswith(good + ".bin")
    raises_one_line(good + "_nope", r"good_nope\.idx: index file not found", data_config)


def test_wrong_magic(good, data_config):
    patch(good + ".idx", 0, b"NOTMMIDX\x00")
    raises_one_line(good, r"good\.idx: wrong magic b'NOTMMIDX\\x00' \(expected", data_config)


def test_wrong_version(good, data_config):
    patch(good + ".idx", 9, struct.pack("<Q", 2))
    raises_one_line(good, r"good\.idx: unsupported index version 2 \(expected 1\)", data_config)


def test_unknown_dtype(good, data_config):
    patch(good + ".idx", 17, struct.pack("<B", 9))
    raises_one_line(good, r"good\.idx: unknown dtype code 9", data_config)


def test_truncated_index(good, data_config):
    truncate(good + ".idx", 8)
    raises_one_line(
        good,
        r"good\.idx: index is \d+ bytes but its header \(30 sequences, 31 document entries\) "
        r"needs \d+: truncated or corrupt",
        data_config,
    )
    truncate(good + ".idx", os.path.getsize(good + ".idx") - 20)
    raises_one_line(good, r"good\.idx: truncated index file \(20 bytes", data_config)


def test_truncated_bin(good, data_config):
    truncate(good + ".bin", 2)
    raises_one_line(
        good,
        r"good\.bin: 238 bytes but the index \(.*good\.idx\) describes 240 \(120 tokens of uint16\): "
        r"truncated or mismatched pair",
        data_config,
    )


def test_bin_longer_than_sizes_say(good, data_config):
    with open(good + ".bin", "ab") as f:
        f.write(b"\x00\x00")
    raises_one_line(good, r"good\.bin: 242 bytes but the index .* describes 240", data_config)


def test_sizes_disagree_with_pointers(good, data_config):
    patch(good + ".idx", 34 + 4, struct.pack("<i", 5))  # second size 3 -> 5
    raises_one_line(good, r"good\.idx: sizes and pointers disagree at sequence 2", data_config)


def test_token_ids_at_or_above_vocab(good, data_config):
    cfg = data_config(train_data_paths=[good])
    build_datasets(cfg, 4, 1, {"train": 4}, vocab_size=10)
    with pytest.raises(
        DataError, match=r"good\.bin: token id 9 at token 10 is outside the model's vocabulary \(size 9\)"
    ):
        build_datasets(cfg, 4, 1, {"train": 4}, vocab_size=9)


def test_empty_dataset(tmp_path, data_config):
    empty = write_indexed_dataset(str(tmp_path / "empty"), [], vocab_size=100)
    raises_one_line(empty, r"empty\.idx: empty dataset \(no documents\)", data_config)
    tiny = write_indexed_dataset(str(tmp_path / "tiny"), [[1, 0]], vocab_size=100)
    with pytest.raises(DataError, match=r"tiny\.idx: the train split has fewer than seq_length \+ 1 = 5 tokens"):
        build_datasets(data_config(train_data_paths=[tiny]), 4, 1, {"train": 4})


def test_missing_splits_and_config(good, data_config):
    with pytest.raises(DataError, match="no training data configured"):
        build_datasets(data_config(), 4, 1, {"train": 4})
    with pytest.raises(DataError, match=r"good\.idx: the valid split \(300,1,0\) gets no documents of 30"):
        build_datasets(data_config(data_path=good, split="300,1,0"), 4, 1, {"train": 4, "valid": 4})
    with pytest.raises(DataError, match=r"valid_nope\.idx: index file not found"):
        build_datasets(
            data_config(train_data_paths=[good], valid_data_paths=[good + "valid_nope"]), 4, 1, {"train": 4, "valid": 4}
        )
    with pytest.raises(DataError, match="data-impl 'cached'"):
        build_datasets(data_config(data_path=good, data_impl="cached"), 4, 1, {"train": 4})


def test_tokenizer_file_missing(tmp_path):
    with pytest.raises(DataError, match=r"spm\.model: tokenizer file not found"):
        build_tokenizer("SPMTokenizer", str(tmp_path / "spm.model"))


def test_document_index_not_increasing(good, data_config):
    # doc_idx starts after header + 30 sizes + 30 pointers; make entry 2 smaller than entry 1
    patch(good + ".idx", 34 + 30 * 4 + 30 * 8 + 2 * 8, struct.pack("<q", 0))
    raises_one_line(
        good, r"good\.idx: document index is not an increasing list from 0 to at most 30 sequences", data_config
    )


@pytest.mark.parametrize(
    "docs,pattern",
    [
        ([[1.0, 2.0, float("nan"), 0.0]] * 10, r"float\.bin: token 2 is nan, not a whole token id \(float32 tokens\)"),
        ([[1.0, 2.0, 3.0, 0.0]] * 5 + [[1.5, 0.0]], r"float\.bin: token 20 is 1\.5, not a whole token id"),
        ([[1.0, float("inf"), 0.0, 0.0]] * 10, r"float\.bin: token 1 is inf, not a whole token id"),
    ],
)
def test_float_tokens_must_be_whole(tmp_path, data_config, docs, pattern):
    """A float .idx (dtype code 6) holding NaN / inf or fractional tokens is refused, never truncated to ids."""
    prefix = write_indexed_dataset(str(tmp_path / "float"), docs, dtype=np.float32)
    with pytest.raises(DataError, match=pattern) as e:
        build_datasets(data_config(train_data_paths=[prefix]), 3, 1, {"train": 4}, vocab_size=100)
    assert "\n" not in str(e.value)


def test_float_tokens_that_are_whole_are_read(tmp_path, data_config):
    prefix = write_indexed_dataset(str(tmp_path / "float"), [[1.0, 2.0, 3.0, 0.0]] * 10, dtype=np.float64)
    train = build_datasets(data_config(train_data_paths=[prefix]), 3, 1, {"train": 4}, vocab_size=100)["train"]
    assert sorted(train[0]["text"].tolist()) == [0, 1, 2, 3]


@pytest.mark.parametrize("which", ["idx", "bin"])
def test_unreadable_dataset_file(good, data_config, monkeypatch, which):
    """A PermissionError on opening the .idx or .bin is one line naming the file (chmod 000 does not stop root,
    so the open is made to fail)."""
    real_open = builtins.open

    def deny(path, *args, **kwargs):
        if str(path).endswith("." + which):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", deny)
    raises_one_line(
        good, rf"good\.{which}: cannot read \(Permission denied\); check the file's permissions", data_config
    )


def _preprocess_cli(tmp_path, vocab_file, source, prefix):
    cmd = [
        sys.executable,
        str(ROOT / "tools/preprocess_data.py"),
        "--input",
        str(source),
        "--output-prefix",
        str(prefix),
        "--vocab-file",
        vocab_file,
        "--workers",
        "1",
        "--no-progress",
    ]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)


@pytest.mark.parametrize("case", ["lone surrogate", "fake gz", "prefix under a file"])
def test_preprocess_bad_input_is_one_line(tmp_path, hf_tokenizer_json, case):
    """preprocess_data.py: a lone surrogate escape in JSONL (names file and line), a .gz that is not gzip, an
    output prefix whose parent is a file: one error line, exit 2, no output written."""
    source, prefix = tmp_path / "in.jsonl", tmp_path / "out"
    lines = ['{"text": "fine"}', '{"text": "a\\ud800b"}' if case == "lone surrogate" else '{"text": "also fine"}']
    source.write_text("\n".join(lines) + "\n")
    if case == "fake gz":
        source = source.rename(tmp_path / "in.jsonl.gz")
        pattern = rf"error: {source}: not a valid gzip file \(.*\); decompress it or fix its name"
    elif case == "prefix under a file":
        (tmp_path / "afile").write_text("x")
        prefix = tmp_path / "afile" / "sub" / "out"
        pattern = rf"error: {tmp_path / 'afile' / 'sub'}: cannot write the output there \(Not a directory"
    else:
        pattern = rf"error: {source}:2: field 'text' holds a lone surrogate '\\ud800' at character 1"
    r = _preprocess_cli(tmp_path, hf_tokenizer_json, source, prefix)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert re.match(pattern, r.stderr), r.stderr
    assert not list(tmp_path.glob("out*"))
