"""Text -> tokens -> NAME_<key>_document.bin/.idx (the engine of tools/preprocess_data.py).

Inputs: .jsonl files (one JSON object per line; the text under each of ``json_keys``), optionally .gz,
and plain text files (.txt or anything else: one document per file, only with a single key). One
dataset is written per key. Every document gets the EOD token appended. Tokenization runs in
``workers`` processes; documents keep their input order.
"""

from __future__ import annotations

import gzip
import json
import multiprocessing as mp
import os
import time
import zlib
from typing import Iterator

import numpy as np

from .errors import DataError
from .indexed_dataset import IndexedDatasetWriter, data_file_paths, token_dtype
from .tokenizer import build_tokenizer

_worker_tok = None


def _open_text(path: str):
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def _is_jsonl(path: str) -> bool:
    return path.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz"))


def _check_input_kind(path, keys) -> bool:
    """True for jsonl input; a plain text file (one document, no fields) with several keys is an error."""
    is_jsonl = _is_jsonl(path)
    if not is_jsonl and len(keys) > 1:
        raise DataError(
            f"{path}: a plain text file is one document without fields; several jsonl keys "
            f"({', '.join(keys)}) need .jsonl input"
        )
    return is_jsonl


def _keys(json_keys) -> tuple:
    keys = (json_keys,) if isinstance(json_keys, str) else tuple(json_keys)
    if not keys:
        raise DataError("no jsonl key given (--jsonl-keys)")
    if len(set(keys)) != len(keys):
        raise DataError(f"--jsonl-keys {' '.join(keys)}: a key is given twice")
    return keys


def iter_records(paths, json_keys=("text",)) -> Iterator[tuple]:
    """For every document of the input files in order, the tuple of its texts under ``json_keys``
    (DataError naming the file and line on bad input). A plain text file is one document with one text,
    so it can only be read with a single key."""
    keys = _keys(json_keys)
    for path in paths:
        if not os.path.isfile(path):
            raise DataError(f"{path}: input file not found")
        is_jsonl = _check_input_kind(path, keys)
        try:
            with _open_text(path) as f:
                if not is_jsonl:
                    yield (f.read(),)
                    continue
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
                    texts = []
                    for key in keys:
                        if not isinstance(obj, dict) or key not in obj:
                            raise DataError(f"{path}:{lineno}: no {key!r} field (choose it with --jsonl-key)")
                        if not isinstance(obj[key], str):
                            raise DataError(f"{path}:{lineno}: field {key!r} is not a string")
                        _check_encodable(obj[key], path, lineno, key)
                        texts.append(obj[key])
                    yield tuple(texts)
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:
            raise DataError(f"{path}: not a valid gzip file ({e}); decompress it or fix its name") from None
        except OSError as e:
            raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def _check_encodable(text: str, path: str, lineno: int, key: str) -> None:
    """DataError for a text holding a lone surrogate (a JSON escape such as \\ud800 without its pair)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(
            f"{path}:{lineno}: field {key!r} holds a lone surrogate {text[e.start]!r} at character "
            f"{e.start} (an unpaired \\uXXXX escape); fix or remove that line"
        ) from None


def iter_documents(paths, json_key: str = "text") -> Iterator[str]:
    """The documents of the input files in order: the text under ``json_key`` of each jsonl line, or the
    whole of a plain text file."""
    for (text,) in iter_records(paths, (json_key,)):
        yield text


def _init_worker(tokenizer_type: str, vocab_file: str) -> None:
    global _worker_tok
    _worker_tok = build_tokenizer(tokenizer_type, vocab_file)


def _encode_batch(records: list) -> list:
    """For each key (position in the record tuples): the token ids of the batch's documents back to back
    (each followed by EOD) and their lengths."""
    out = []
    for k in range(len(records[0])):
        ids: list[int] = []
        lengths = []
        for record in records:
            before = len(ids)
            ids.extend(_worker_tok.encode(record[k]))
            ids.append(_worker_tok.eod)
            lengths.append(len(ids) - before)
        out.append((np.asarray(ids, dtype=np.int32), lengths))
    return out


def _batches(docs, max_docs: int = 256, max_chars: int = 1 << 20):
    """Groups of documents (fewer inter-process messages than one document at a time)."""
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc)
        chars += sum(map(len, doc))
        if len(batch) >= max_docs or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def output_prefix_for(output_prefix: str, json_key: str) -> str:
    """NeoX's naming: OUTPUT_PREFIX_<key>_document."""
    return f"{output_prefix}_{json_key}_document"


def preprocess(
    inputs,
    output_prefix: str,
    tokenizer_type: str,
    vocab_file: str,
    json_keys=("text",),
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Tokenize ``inputs`` into OUTPUT_PREFIX_<key>_document.bin/.idx, one dataset per key of ``json_keys``
    (a key or a list of keys), all in one pass over the inputs. Returns {prefix (of the first key),
    prefixes {key: prefix}, documents, tokens (all keys), tokens_by_key, seconds, tokens_per_s}.

    Refuses to overwrite any existing output unless ``overwrite`` (checked for every key before any work).
    Every output is written under a temporary name; on any error all are removed, and the finished files
    are renamed into place together at the end."""
    keys = _keys(json_keys)
    tok = build_tokenizer(tokenizer_type, vocab_file)  # fail early on a bad tokenizer file
    prefixes = {key: output_prefix_for(output_prefix, key) for key in keys}
    if not overwrite:
        for prefix in prefixes.values():
            for p in data_file_paths(prefix):
                if os.path.exists(p):
                    raise DataError(f"{p}: output exists; pass --overwrite to replace it")
    for p in inputs:
        if not os.path.isfile(p):
            raise DataError(f"{p}: input file not found")
        _check_input_kind(p, keys)
    records = iter_records(inputs, keys)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(unit=" docs", desc=os.path.basename(str(output_prefix)), dynamic_ncols=True, mininterval=0.5)
    t0 = time.perf_counter()
    pool = None
    writers: list[IndexedDatasetWriter] = []
    try:
        for key in keys:
            writers.append(IndexedDatasetWriter(prefixes[key], dtype=token_dtype(tok.vocab_size), overwrite=overwrite))
        if workers > 1:
            ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
            pool = ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer_type, str(vocab_file)))
            encoded = pool.imap(_encode_batch, _batches(records))
        else:
            _init_worker(tokenizer_type, str(vocab_file))
            encoded = map(_encode_batch, _batches(records))
        for per_key in encoded:
            for writer, (ids, lengths) in zip(writers, per_key):
                writer.add_documents(ids, lengths)
            if bar is not None:
                rate = sum(w.num_tokens for w in writers) / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix_str(f"{rate:,.0f} tokens/s", refresh=False)
                bar.update(len(per_key[0][1]))
        documents = writers[0].num_documents
        if documents == 0:
            raise DataError(f"{writers[0].bin_path}: the inputs hold no documents ({', '.join(map(str, inputs))})")
        for w in writers:
            w.prepare()
        for w in writers:
            w.commit()
    except BaseException:
        for w in writers:
            w.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    tokens_by_key = {key: w.num_tokens for key, w in zip(keys, writers)}
    tokens = sum(tokens_by_key.values())
    return {
        "prefix": prefixes[keys[0]],
        "prefixes": prefixes,
        "documents": documents,
        "tokens": tokens,
        "tokens_by_key": tokens_by_key,
        "seconds": seconds,
        "tokens_per_s": tokens / max(seconds, 1e-9),
    }
