"""The Megatron / GPT-NeoX mmap indexed dataset (NAME.bin + NAME.idx), read and written.

On-disk format (little-endian), identical to what GPT-NeoX's ``MMapIndexedDataset`` reads and writes:

    NAME.bin   token ids of every sequence back to back, in the dtype given by the .idx
    NAME.idx   magic   b"MMIDIDX\\x00\\x00"               9 bytes
               version uint64 (= 1)
               dtype   uint8 code (DTYPE_CODES below)
               n       uint64 number of sequences
               m       uint64 length of the document index (number of documents + 1)
               sizes   int32[n]   tokens per sequence
               pointer int64[n]   byte offset of each sequence in .bin
               doc_idx int64[m]   first sequence of each document, then n

We write one sequence per document (as NeoX's preprocess_data.py does), so sequences and documents
coincide and ``doc_idx`` is ``0..n``. Like NeoX's GPT dataset, the readers here treat each sequence as a
document.
"""

from __future__ import annotations

import os
import struct
import uuid
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from .errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequences, doc_idx length
DTYPE_CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float32,
    7: np.float64,
    8: np.uint16,
}
CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}
_CHUNK = 1 << 24  # elements per chunk for whole-file passes (bounded memory on Pile-sized files)


def token_dtype(vocab_size: Optional[int]) -> type:
    """uint16 when the vocabulary fits (below 65500, as NeoX chooses), else int32."""
    if vocab_size is not None and vocab_size < 65500:
        return np.uint16
    return np.int32


def data_file_paths(prefix) -> tuple[str, str]:
    prefix = str(prefix)
    return prefix + ".bin", prefix + ".idx"


def _tmp_name(path: str) -> str:
    """A temporary name next to ``path``, unique across processes and hosts (shared file systems)."""
    return f"{path}.tmp-{uuid.uuid4().hex[:12]}"


class MMapIndexedDataset:
    """Read-only view of NAME.bin / NAME.idx (memory-mapped); the files are validated on open.

    ``len(ds)`` sequences (= documents), ``ds[i]`` the token ids of sequence i (a numpy view),
    ``ds.sizes`` (int32), ``ds.pointers`` (int64), ``ds.doc_idx`` (int64), ``ds.dtype``.
    Any inconsistency raises ``DataError`` with the file name and the problem.
    """

    def __init__(self, prefix, allow_empty: bool = False):
        self.prefix = str(prefix)
        self.bin_path, self.idx_path = data_file_paths(prefix)
        for p, what in ((self.idx_path, "index"), (self.bin_path, "token")):
            if not os.path.isfile(p):
                raise DataError(f"{p}: {what} file not found (dataset prefix {self.prefix!r} needs both .bin and .idx)")
        reading = self.idx_path
        try:
            self._read_index()
            reading = self.bin_path
            self._check_bin()
        except OSError as e:
            raise DataError(
                f"{e.filename or reading}: cannot read ({e.strerror or e}); check the file's permissions"
            ) from None
        if len(self) == 0 and not allow_empty:
            raise DataError(f"{self.idx_path}: empty dataset (no documents)")

    # -- opening ---------------------------------------------------------------------------------
    def _read_index(self) -> None:
        path = self.idx_path
        file_size = os.path.getsize(path)
        if file_size < HEADER.size:
            raise DataError(f"{path}: truncated index file ({file_size} bytes, the header alone is {HEADER.size})")
        with open(path, "rb") as f:
            magic, version, code, n, m = HEADER.unpack(f.read(HEADER.size))
        if magic != MAGIC:
            raise DataError(f"{path}: wrong magic {magic!r} (expected {MAGIC!r}); not a Megatron/NeoX mmap index")
        if version != VERSION:
            raise DataError(f"{path}: unsupported index version {version} (expected {VERSION})")
        if code not in DTYPE_CODES:
            raise DataError(f"{path}: unknown dtype code {code} (expected one of {sorted(DTYPE_CODES)})")
        self.dtype = np.dtype(DTYPE_CODES[code])
        expected = HEADER.size + n * 4 + n * 8 + m * 8
        if file_size != expected:
            raise DataError(
                f"{path}: index is {file_size} bytes but its header ({n} sequences, {m} document "
                f"entries) needs {expected}: truncated or corrupt"
            )
        if m < 1:
            raise DataError(f"{path}: document index is empty (needs at least the final count)")
        self._idx_mmap = np.memmap(path, mode="r", dtype=np.uint8)
        off = HEADER.size
        self.sizes = np.frombuffer(self._idx_mmap, dtype=np.int32, count=n, offset=off)
        off += n * 4
        self.pointers = np.frombuffer(self._idx_mmap, dtype=np.int64, count=n, offset=off)
        off += n * 8
        self.doc_idx = np.frombuffer(self._idx_mmap, dtype=np.int64, count=m, offset=off)
        self._check_index_arrays()

    def _check_index_arrays(self) -> None:
        path, n = self.idx_path, len(self.sizes)
        item = self.dtype.itemsize
        # Megatron's builder starts the document index at 0 and appends the sequence count after each
        # document, so it ends at n; only ordering and bounds are required (readers here never use it).
        bad_doc_idx = self.doc_idx[0] != 0 or self.doc_idx[-1] > n
        for start in range(0, len(self.doc_idx) - 1, _CHUNK):
            if bad_doc_idx:
                break
            bad_doc_idx = bool(np.any(np.diff(self.doc_idx[start : start + _CHUNK + 1]) < 0))
        if bad_doc_idx:
            raise DataError(f"{path}: document index is not an increasing list from 0 to at most {n} sequences")
        offset = 0  # expected byte offset of the next sequence; checked chunk by chunk
        for start in range(0, n, _CHUNK):
            sizes = self.sizes[start : start + _CHUNK].astype(np.int64)
            if np.any(sizes < 0):
                raise DataError(f"{path}: negative sequence size")
            expect = offset + np.concatenate(([0], np.cumsum(sizes[:-1]))) * item
            if not np.array_equal(expect, self.pointers[start : start + _CHUNK]):
                bad = start + int(np.flatnonzero(expect != self.pointers[start : start + _CHUNK])[0])
                raise DataError(f"{path}: sizes and pointers disagree at sequence {bad}")
            offset = int(expect[-1] + sizes[-1] * item)
        self._total_bytes = offset

    def _check_bin(self) -> None:
        size = os.path.getsize(self.bin_path)
        if size != self._total_bytes:
            raise DataError(
                f"{self.bin_path}: {size} bytes but the index ({self.idx_path}) describes "
                f"{self._total_bytes} ({self._total_bytes // self.dtype.itemsize} tokens of "
                f"{self.dtype.name}): truncated or mismatched pair"
            )
        # np.memmap refuses empty files; an all-empty dataset gets an empty array instead
        self.tokens = np.memmap(self.bin_path, mode="r", dtype=self.dtype) if size else np.zeros(0, dtype=self.dtype)

    # -- access ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"sequence {i} out of range for {len(self)} sequences")
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self.tokens[start : start + int(self.sizes[i])]

    def get(self, i: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Part of sequence i: ``length`` tokens from ``offset`` (to its end when None)."""
        seq = self[i]
        return seq[offset:] if length is None else seq[offset : offset + length]

    @property
    def num_tokens(self) -> int:
        return self._total_bytes // self.dtype.itemsize

    def token_range(self, chunk: Optional[int] = None) -> Optional[dict]:
        """Smallest and largest token id in .bin and where each first occurs:
        {"min", "min_pos", "max", "max_pos"} (token positions in .bin); None when .bin is empty.

        One pass over the memmap in chunks of ``chunk`` tokens (default 2^24: bounded memory on
        Pile-sized files), each reduced by numpy; the position needs one more look at a single chunk.
        For unsigned dtypes (ids cannot be negative) "min" and "min_pos" are None (not computed).
        A float dtype (codes 6 / 7) must hold whole numbers: a NaN, inf or fractional token is a DataError
        naming the file and the first such token (never truncated to an id).
        """
        chunk = int(chunk or _CHUNK)
        toks, n = self.tokens, len(self.tokens)
        if n == 0:
            return None
        signed = self.dtype.kind != "u"
        hi = lo = None
        hi_start = lo_start = 0
        for start in range(0, n, chunk):
            part = toks[start : start + chunk]
            if self.dtype.kind == "f":
                self._check_whole(part, start)
            m = part.max()
            if hi is None or m > hi:  # strictly greater: the first chunk holding the maximum
                hi, hi_start = m, start
            if signed:
                m = part.min()
                if lo is None or m < lo:
                    lo, lo_start = m, start
        out = {
            "min": None,
            "min_pos": None,
            "max": int(hi),
            "max_pos": hi_start + int(np.argmax(toks[hi_start : hi_start + chunk])),
        }
        if signed:
            out["min"], out["min_pos"] = int(lo), lo_start + int(np.argmin(toks[lo_start : lo_start + chunk]))
        return out

    def _check_whole(self, part: np.ndarray, start: int) -> None:
        """DataError at the first token of ``part`` (starting at token ``start``) that is not a whole number."""
        bad = ~np.isfinite(part)
        bad[~bad] = part[~bad] != np.floor(part[~bad])
        if bad.any():
            at = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"{self.bin_path}: token {start + at} is {float(part[at])}, not a whole token id "
                f"({self.dtype.name} tokens); rewrite the dataset with integer ids "
                "(tools/preprocess_data.py)"
            )

    def max_token(self) -> int:
        """Largest token id in .bin (a chunked pass over the file); -1 when empty."""
        r = self.token_range()
        return -1 if r is None else r["max"]

    def check_vocab(self, vocab_size: int, token_range: Optional[dict] = None) -> None:
        """DataError if a token id is >= vocab_size or negative. ``token_range`` is the result of
        :meth:`token_range` when already known (e.g. cached), else a full chunked pass over .bin is made."""
        r = self.token_range() if token_range is None else token_range
        msg = vocab_problem(self.bin_path, r, vocab_size)
        if msg:
            raise DataError(msg)


def vocab_problem(bin_path: str, token_range: Optional[dict], vocab_size: int) -> Optional[str]:
    """The one-line error for a .bin whose ``token_range`` (see MMapIndexedDataset.token_range) does not
    fit ``vocab_size`` (the largest offending id and its first position), else None."""
    if not token_range:
        return None
    if token_range["max"] >= vocab_size:
        bad, pos = token_range["max"], token_range["max_pos"]
    elif token_range.get("min") is not None and token_range["min"] < 0:
        bad, pos = token_range["min"], token_range["min_pos"]
    else:
        return None
    return (
        f"{bin_path}: token id {bad} at token {pos} is outside the model's vocabulary "
        f"(size {vocab_size}); wrong tokenizer or vocab size?"
    )


class IndexedDatasetWriter:
    """Streams documents into NAME.bin / NAME.idx under temporary names; ``finish()`` renames both.

    Use as a context manager: on an exception the temporary files are removed and nothing is left
    half-written. Refuses to replace existing output unless ``overwrite``.
    """

    def __init__(self, prefix, dtype=np.uint16, overwrite: bool = False):
        self.prefix = str(prefix)
        self.bin_path, self.idx_path = data_file_paths(prefix)
        if not overwrite:
            for p in (self.bin_path, self.idx_path):
                if os.path.exists(p):
                    raise DataError(f"{p}: output exists; pass overwrite (--overwrite) to replace it")
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise DataError(f"{self.bin_path}: dtype {self.dtype} has no Megatron dtype code")
        self._bin_tmp, self._idx_tmp = _tmp_name(self.bin_path), _tmp_name(self.idx_path)
        folder = Path(self.bin_path).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self._bin = open(self._bin_tmp, "wb")
        except OSError as e:
            raise DataError(
                f"{folder}: cannot write the output there ({e.strerror or e}: {e.filename}); choose "
                "another output prefix"
            ) from None
        self._sizes: list[int] = []
        self.num_tokens = 0
        self._done = self._prepared = False

    def add_document(self, tokens: Sequence[int]) -> None:
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise DataError(f"{self.bin_path}: a document must be a 1-D sequence of token ids")
        self.add_documents(arr, [arr.size])

    def add_documents(self, tokens: np.ndarray, lengths) -> None:
        """Several documents at once: ``tokens`` back to back, ``lengths`` tokens each."""
        tokens, lengths = np.asarray(tokens), [int(n) for n in lengths]
        if sum(lengths) != len(tokens):
            raise ValueError("lengths do not add up to the number of tokens")
        if tokens.size and self.dtype.kind in "iu":
            info = np.iinfo(self.dtype)
            if int(tokens.min()) < info.min or int(tokens.max()) > info.max:
                raise DataError(
                    f"{self.bin_path}: token ids {int(tokens.min())}..{int(tokens.max())} do not fit {self.dtype.name}"
                )
        self._bin.write(tokens.astype(self.dtype, copy=False).tobytes(order="C"))
        self._sizes.extend(lengths)
        self.num_tokens += int(tokens.size)

    @property
    def num_documents(self) -> int:
        return len(self._sizes)

    def finish(self) -> str:
        """Write the index and rename both files into place; returns the prefix."""
        self.prepare()
        return self.commit()

    def prepare(self) -> None:
        """Close .bin and write the index, both still under temporary names (see commit)."""
        if self._prepared:
            return
        self._bin.close()
        sizes = np.asarray(self._sizes, dtype=np.int64)
        if np.any(sizes > np.iinfo(np.int32).max):
            raise DataError(f"{self.idx_path}: a document has more than 2^31-1 tokens")
        n = len(sizes)
        pointers = np.zeros(n, dtype=np.int64)
        if n > 1:
            pointers[1:] = np.cumsum(sizes[:-1]) * self.dtype.itemsize
        with open(self._idx_tmp, "wb") as f:
            f.write(HEADER.pack(MAGIC, VERSION, CODE_OF_DTYPE[self.dtype], n, n + 1))
            f.write(sizes.astype("<i4").tobytes())
            f.write(pointers.astype("<i8").tobytes())
            f.write(np.arange(n + 1, dtype="<i8").tobytes())
        self._prepared = True

    def commit(self) -> str:
        """Rename the prepared files into place (several writers: prepare all, then commit all)."""
        self.prepare()
        # .bin first: a reader that sees the new .idx also sees its .bin
        os.replace(self._bin_tmp, self.bin_path)
        os.replace(self._idx_tmp, self.idx_path)
        self._done = True
        return self.prefix

    def abort(self) -> None:
        if not self._bin.closed:
            self._bin.close()
        for p in (self._bin_tmp, self._idx_tmp):
            if os.path.exists(p):
                os.remove(p)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None or not self._done:
            if exc_type is None:
                self.finish()
            else:
                self.abort()
        return False


def write_indexed_dataset(
    prefix, documents: Iterable[Sequence[int]], vocab_size: Optional[int] = None, dtype=None, overwrite: bool = False
) -> str:
    """Write ``documents`` (each a sequence of token ids, written as given: append EOD yourself) to
    PREFIX.bin / PREFIX.idx; dtype from ``vocab_size`` (uint16 below 65500, else int32) unless given.
    Returns the prefix."""
    dtype = dtype if dtype is not None else token_dtype(vocab_size)
    with IndexedDatasetWriter(prefix, dtype=dtype, overwrite=overwrite) as w:
        for doc in documents:
            w.add_document(doc)
        return w.finish()
