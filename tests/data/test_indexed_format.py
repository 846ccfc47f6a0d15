"""The Megatron/NeoX mmap .bin/.idx byte format, checked against readers/writers written here from the
format description alone (magic, version, dtype code, counts, sizes, pointers, document index)."""

import os
import struct

import numpy as np
import pytest

from neox_l2e.data import DataError, MMapIndexedDataset, token_dtype, write_indexed_dataset
from neox_l2e.data.indexed_dataset import IndexedDatasetWriter


def handmade_pair(prefix, docs, dtype_code, np_dtype):
    """Write NAME.bin / NAME.idx byte by byte from the format description."""
    itemsize = np.dtype(np_dtype).itemsize
    with open(f"{prefix}.bin", "wb") as f:
        for d in docs:
            for t in d:
                f.write(struct.pack("<" + {1: "B", 2: "b", 3: "h", 4: "i", 5: "q", 8: "H"}[dtype_code], t))
    idx = bytearray(b"MMIDIDX\x00\x00")
    idx += struct.pack("<Q", 1)
    idx += struct.pack("<B", dtype_code)
    idx += struct.pack("<Q", len(docs))
    idx += struct.pack("<Q", len(docs) + 1)
    for d in docs:
        idx += struct.pack("<i", len(d))
    offset = 0
    for d in docs:
        idx += struct.pack("<q", offset)
        offset += len(d) * itemsize
    for i in range(len(docs) + 1):
        idx += struct.pack("<q", i)
    with open(f"{prefix}.idx", "wb") as f:
        f.write(bytes(idx))


def independent_reader(prefix):
    """Parse NAME.idx / NAME.bin with struct only, from the format description."""
    with open(f"{prefix}.idx", "rb") as f:
        data = f.read()
    assert data[:9] == b"MMIDIDX\x00\x00"
    (version,) = struct.unpack_from("<Q", data, 9)
    (code,) = struct.unpack_from("<B", data, 17)
    n, m = struct.unpack_from("<QQ", data, 18)
    pos = 34
    sizes = struct.unpack_from(f"<{n}i", data, pos)
    pos += 4 * n
    pointers = struct.unpack_from(f"<{n}q", data, pos)
    pos += 8 * n
    doc_idx = struct.unpack_from(f"<{m}q", data, pos)
    pos += 8 * m
    assert pos == len(data)
    fmt, item = {8: ("H", 2), 4: ("i", 4)}[code]
    with open(f"{prefix}.bin", "rb") as f:
        blob = f.read()
    docs = [list(struct.unpack_from(f"<{s}{fmt}", blob, p)) for s, p in zip(sizes, pointers)]
    return {
        "version": version,
        "code": code,
        "n": n,
        "m": m,
        "sizes": list(sizes),
        "pointers": list(pointers),
        "doc_idx": list(doc_idx),
        "docs": docs,
        "bin_len": len(blob),
        "item": item,
    }


DOCS = [[5, 6, 7, 0], [1, 0], [300, 65000, 2, 9, 0], [0]]


@pytest.mark.parametrize("code,dtype", [(8, np.uint16), (4, np.int32), (3, np.int16), (5, np.int64)])
def test_handmade_pair_reads(tmp_path, code, dtype):
    docs = DOCS if code in (8, 4, 5) else [[5, 6, 7, 0], [1, 0], [300, 2, 9, 0], [0]]
    prefix = str(tmp_path / "hand")
    handmade_pair(prefix, docs, code, dtype)
    ds = MMapIndexedDataset(prefix)
    assert len(ds) == len(docs)
    assert ds.dtype == np.dtype(dtype)
    assert ds.sizes.tolist() == [len(d) for d in docs]
    assert ds.doc_idx.tolist() == list(range(len(docs) + 1))
    for i, d in enumerate(docs):
        assert ds[i].tolist() == d
    assert ds.get(2, 1, 2).tolist() == docs[2][1:3]


@pytest.mark.parametrize("vocab,code", [(8000, 8), (65499, 8), (65500, 4), (50277, 8), (100_000, 4)])
def test_written_pair_parses_with_independent_reader(tmp_path, vocab, code):
    prefix = str(tmp_path / "ours")
    docs = [[1, 2, 3, vocab - 1], [vocab - 1], [4, 0]]
    write_indexed_dataset(prefix, docs, vocab_size=vocab)
    r = independent_reader(prefix)
    assert (r["version"], r["code"], r["n"], r["m"]) == (1, code, 3, 4)
    assert r["sizes"] == [4, 1, 2]
    assert r["pointers"] == [0, 4 * r["item"], 5 * r["item"]]
    assert r["doc_idx"] == [0, 1, 2, 3]
    assert r["docs"] == docs
    assert r["bin_len"] == 7 * r["item"]


def test_token_dtype_rule():
    assert token_dtype(8000) is np.uint16
    assert token_dtype(65499) is np.uint16
    assert token_dtype(65500) is np.int32
    assert token_dtype(None) is np.int32


def test_refuses_to_overwrite_and_leaves_nothing_half_written(tmp_path):
    prefix = str(tmp_path / "d")
    write_indexed_dataset(prefix, [[1, 2]], vocab_size=10)
    before = open(prefix + ".bin", "rb").read()
    with pytest.raises(DataError, match="output exists"):
        write_indexed_dataset(prefix, [[3]], vocab_size=10)
    write_indexed_dataset(prefix, [[3]], vocab_size=10, overwrite=True)
    assert MMapIndexedDataset(prefix)[0].tolist() == [3]
    assert before != open(prefix + ".bin", "rb").read()

    # an error mid-way: no output, no temporary files
    def docs():
        yield [1, 2]
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_indexed_dataset(str(tmp_path / "e"), docs(), vocab_size=10)
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx"]
    # a token that does not fit the dtype is an error, not a silent wrap-around
    with pytest.raises(DataError, match="do not fit uint16"):
        with IndexedDatasetWriter(str(tmp_path / "f"), dtype=np.uint16) as w:
            w.add_document([70000])
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx"]


def test_chunked_checks_match_whole_file_checks(tmp_path, monkeypatch):
    """Pile-sized files are validated chunk by chunk; tiny chunks must find the same problems."""
    from neox_l2e.data import indexed_dataset

    monkeypatch.setattr(indexed_dataset, "_CHUNK", 3)
    docs = [[i, i + 1, 0] for i in range(1, 20)]
    prefix = write_indexed_dataset(str(tmp_path / "c"), docs, vocab_size=100)
    ds = MMapIndexedDataset(prefix)
    assert [ds[i].tolist() for i in range(len(ds))] == docs
    assert ds.max_token() == 20
    ds.check_vocab(21)
    with pytest.raises(DataError, match=r"token id 20 at token 55 is outside"):
        ds.check_vocab(20)
    with open(prefix + ".idx", "r+b") as f:  # pointer of sequence 7 (in the third chunk) off by one token
        f.seek(34 + 19 * 4 + 7 * 8)
        f.write(struct.pack("<q", 7 * 3 * 2 + 2))
    with pytest.raises(DataError, match="sizes and pointers disagree at sequence 7"):
        MMapIndexedDataset(prefix)


def test_multi_sequence_documents_read(tmp_path):
    """Megatron files made with sentence splitting have several sequences per document: doc_idx [0, 2, 4]."""
    prefix = str(tmp_path / "sent")
    handmade_pair(prefix, [[1, 2], [3, 0], [4], [5, 6, 0]], 8, np.uint16)
    with open(prefix + ".idx", "r+b") as f:
        f.seek(18 + 8)
        f.write(struct.pack("<Q", 3))  # 3 document-index entries
        f.seek(34 + 4 * 4 + 4 * 8)
        f.write(struct.pack("<3q", 0, 2, 4))
        f.truncate(34 + 4 * 4 + 4 * 8 + 3 * 8)
    ds = MMapIndexedDataset(prefix)
    assert len(ds) == 4 and ds.doc_idx.tolist() == [0, 2, 4]
    assert [ds[i].tolist() for i in range(4)] == [[1, 2], [3, 0], [4], [5, 6, 0]]
