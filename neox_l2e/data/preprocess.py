"""Text -> tokens -> NAME_<key>_document.bin/.idx (the engine of tools/preprocess_data.py).

Inputs: .jsonl files (one JSON object per line; the text under ``json_key``), optionally .gz, and plain
text files (.txt or anything else: one document per file). Every document gets the EOD token appended.
Tokenization runs in ``workers`` processes; documents keep their input order.
"""
from __future__ import annotations

import gzip
import json
import multiprocessing as mp
import os
import time
from typing import Iterator, Optional

import numpy as np

from .errors import DataError
from .indexed_dataset import IndexedDatasetWriter, data_file_paths, token_dtype
from .tokenizer import build_tokenizer

_worker_tok = None


def _open_text(path: str):
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def iter_documents(paths, json_key: str = "text") -> Iterator[str]:
    """The documents of the input files in order (DataError naming the file and line on bad input)."""
    for path in paths:
        if not os.path.isfile(path):
            raise DataError(f"{path}: input file not found")
        is_jsonl = path.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz"))
        try:
            with _open_text(path) as f:
                if not is_jsonl:
                    yield f.read()
                    continue
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
                    if not isinstance(obj, dict) or json_key not in obj:
                        raise DataError(f"{path}:{lineno}: no {json_key!r} field (choose it with --jsonl-key)")
                    text = obj[json_key]
                    if not isinstance(text, str):
                        raise DataError(f"{path}:{lineno}: field {json_key!r} is not a string")
                    yield text
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _init_worker(tokenizer_type: str, vocab_file: str) -> None:
    global _worker_tok
    _worker_tok = build_tokenizer(tokenizer_type, vocab_file)


def _encode_batch(texts: list) -> tuple[np.ndarray, list]:
    """Token ids of several documents back to back (each followed by EOD) and their lengths."""
    ids: list[int] = []
    lengths = []
    for text in texts:
        before = len(ids)
        ids.extend(_worker_tok.encode(text))
        ids.append(_worker_tok.eod)
        lengths.append(len(ids) - before)
    return np.asarray(ids, dtype=np.int32), lengths


def _batches(docs, max_docs: int = 256, max_chars: int = 1 << 20):
    """Groups of documents (fewer inter-process messages than one document at a time)."""
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if len(batch) >= max_docs or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def preprocess(inputs, output_prefix: str, tokenizer_type: str, vocab_file: str, json_key: str = "text",
               workers: int = 1, overwrite: bool = False, progress: bool = True) -> dict:
    """Tokenize ``inputs`` into OUTPUT_PREFIX_<json_key>_document.bin/.idx; returns
    {prefix, documents, tokens, seconds, tokens_per_s}. Refuses to overwrite unless ``overwrite``."""
    tok = build_tokenizer(tokenizer_type, vocab_file)  # fail early on a bad tokenizer file
    prefix = f"{output_prefix}_{json_key}_document"
    if not overwrite:
        for p in data_file_paths(prefix):
            if os.path.exists(p):
                raise DataError(f"{p}: output exists; pass --overwrite to replace it")
    for p in inputs:
        if not os.path.isfile(p):
            raise DataError(f"{p}: input file not found")
    docs = iter_documents(inputs, json_key)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(unit=" docs", desc=os.path.basename(prefix), dynamic_ncols=True, mininterval=0.5)
    t0 = time.perf_counter()
    pool = None
    try:
        with IndexedDatasetWriter(prefix, dtype=token_dtype(tok.vocab_size), overwrite=overwrite) as writer:
            if workers > 1:
                ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
                pool = ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer_type, str(vocab_file)))
                encoded = pool.imap(_encode_batch, _batches(docs))
            else:
                _init_worker(tokenizer_type, str(vocab_file))
                encoded = map(_encode_batch, _batches(docs))
            for ids, lengths in encoded:
                writer.add_documents(ids, lengths)
                if bar is not None:
                    rate = writer.num_tokens / max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix_str(f"{rate:,.0f} tokens/s", refresh=False)
                    bar.update(len(lengths))
            documents, tokens = writer.num_documents, writer.num_tokens
            if documents == 0:
                raise DataError(f"{prefix}.bin: the inputs hold no documents ({', '.join(map(str, inputs))})")
            writer.finish()
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    return {"prefix": prefix, "documents": documents, "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / max(seconds, 1e-9)}
