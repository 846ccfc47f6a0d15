"""GPT training samples from mmap indexed datasets: splits, cached epoch order, blending.

    datasets = build_datasets(cfg.data, seq_length, seed, {"train": N, "valid": M, "test": K}, vocab_size)
    datasets["train"][i] -> {"text": np.int64 array of seq_length + 1 tokens}

Sources (as GPT-NeoX): ``train-data-paths`` / ``valid-data-paths`` / ``test-data-paths`` with optional
``*-data-weights`` (default: proportional to each dataset's tokens), or ``data-path`` whose
documents are split by ``split`` ("969,30,1": contiguous document ranges, as NeoX does). A yml config
gives one data-path prefix; build_datasets also takes a list of them: each is split the same way and the
parts of a split are blended in proportion to their tokens.

Which splits must exist: train always; valid and test whenever paths are given for them, and valid also
when it comes from ``split`` with a positive weight and num_samples["valid"] > 0. A test range that
rounds to zero documents (e.g. weight 1 of 1000 on a small corpus) gives None with a warning, as NeoX
does: the training loop never reads it.

The epoch order (doc_idx, sample_idx, shuffle_idx) is "stable" or "neox" (``data-order``, see
neox_l2e.data.sample_index and NeoXConfig.data_order); with "neox" the number of samples per dataset and the
blending follow GPT-NeoX too (see build_datasets). The order is cached as .npy files in ``data-cache-dir`` (default:
next to the data) under a name holding a hash of everything it depends on: the dataset's path, the
.bin/.idx sizes and modification times, the document range, seq_length, seed, num_samples and the order. A
change of any of these gives a different name, so a stale order is never reused; a ``_meta.json`` written
last marks a complete entry. Every rank may build the same entry concurrently: files are written under temporary
names and renamed, and all ranks write identical bytes.

Token ids are checked against vocab_size when a dataset is opened, before any sample is read: one
chunked, memory-bounded pass over each .bin finds its smallest and largest id. For a .bin of at least
``vocab_stamp_min_bytes`` (default VOCAB_STAMP_MIN_BYTES, 1 GiB) that result is cached in a small
``NAME_tokens_HASH.json`` stamp (NAME: the prefix's file name) in the folder of the epoch order, keyed like
it (path, .bin/.idx sizes and modification times), so later runs on unchanged data skip the pass;
smaller files are simply read again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from typing import Optional

import numpy as np
import torch

from .errors import DataError
from .indexed_dataset import MMapIndexedDataset, _tmp_name
from .sample_index import (
    build_blending_indices,
    build_epoch_order,
    build_neox_blending_indices,
    build_neox_order,
    extend_order,
)

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
VOCAB_STAMP_MIN_BYTES = 1 << 30  # .bin files at least this big get their token range cached in a stamp
CACHE_FORMAT = "neox-l2e-epoch-order-v2"
DATA_ORDERS = ("stable", "neox")
NEOX_BLEND_FACTOR = 1.005  # NeoX asks each dataset of a blend for 0.5% more samples than its share
TOKEN_STAMP_FORMAT = "neox-l2e-token-range-v1"


# ------------------------------------------------------------------------------------------------
# splits


def parse_split(split) -> list[float]:
    """'969,30,1' (or '969/30/1', or a list) -> three normalised weights (missing ones are 0)."""
    text = split if isinstance(split, str) else ",".join(str(s) for s in split)
    parts = [p.strip() for p in text.replace("/", ",").split(",") if p.strip()]
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        raise DataError(f"split {text!r}: expected up to three numbers like '969,30,1'") from None
    if not 1 <= len(weights) <= 3 or any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
        raise DataError(
            f"split {text!r}: expected up to three non-negative numbers with a positive sum, like '969,30,1'"
        )
    weights += [0.0] * (3 - len(weights))
    total = sum(weights)
    return [w / total for w in weights]


def split_ranges(split, num_docs: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) document ranges for train, valid, test (NeoX's rounding: each part is
    round(weight * n), and the boundaries are shifted so the last one is exactly n)."""
    bounds = [0]
    for w in parse_split(split):
        bounds.append(bounds[-1] + int(round(w * num_docs)))
    excess = bounds[-1] - num_docs
    bounds = [0] + [max(0, b - excess) for b in bounds[1:]]
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


# ------------------------------------------------------------------------------------------------
# one dataset


def _file_stamp(path: str) -> list:
    st = os.stat(path)
    return [os.path.basename(path), st.st_size, st.st_mtime_ns]


def _default_cache_dir(indexed: MMapIndexedDataset, cache_dir) -> str:
    return str(cache_dir) if cache_dir else os.path.dirname(os.path.abspath(indexed.prefix))


def _write_json_atomic(path: str, obj) -> None:
    tmp = _tmp_name(path)
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def token_range_stamp_path(indexed: MMapIndexedDataset, cache_dir: Optional[str] = None) -> tuple[str, dict]:
    """(stamp path, key) of the cached token range of ``indexed``: the key holds the dataset's real path
    and the .bin/.idx sizes and modification times, so any change of the data gives a new name."""
    key = {
        "format": TOKEN_STAMP_FORMAT,
        "prefix": os.path.realpath(indexed.prefix),
        "files": [_file_stamp(indexed.bin_path), _file_stamp(indexed.idx_path)],
    }
    if indexed.dtype.kind == "f":  # float tokens: the range is only valid once they were checked to be whole
        key["whole_ids"] = True
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = f"{os.path.basename(indexed.prefix)}_tokens_{digest}.json"
    return os.path.join(_default_cache_dir(indexed, cache_dir), name), key


def cached_token_range(
    indexed: MMapIndexedDataset, cache_dir: Optional[str] = None, stamp_min_bytes: Optional[int] = None
) -> tuple[Optional[dict], bool]:
    """(token range, reused) of ``indexed`` (see MMapIndexedDataset.token_range). A .bin of at least
    ``stamp_min_bytes`` (default VOCAB_STAMP_MIN_BYTES) has the result read from / written to its stamp
    (see token_range_stamp_path); ``reused`` says whether the stamp spared the pass over .bin."""
    limit = VOCAB_STAMP_MIN_BYTES if stamp_min_bytes is None else int(stamp_min_bytes)
    if os.path.getsize(indexed.bin_path) < limit:
        return indexed.token_range(), False
    path, key = token_range_stamp_path(indexed, cache_dir)
    try:
        with open(path) as f:
            stamp = json.load(f)
        if stamp.get("key") == key:
            r = stamp["range"]
            if r is None or (isinstance(r.get("max"), int) and isinstance(r.get("max_pos"), int)):
                return r, True
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        pass  # no stamp or a damaged one: recompute
    r = indexed.token_range()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _write_json_atomic(path, {"key": key, "range": r})
    except OSError as e:  # a read-only data folder: check again next time
        log.warning(
            "could not cache the token range of %s in %s (%s); set data-cache-dir",
            indexed.bin_path,
            os.path.dirname(path),
            e,
        )
    return r, False


class GPTDataset(torch.utils.data.Dataset):
    """Samples of seq_length + 1 tokens from documents [start, end) of one indexed dataset, in the
    cached epoch order. ``len()`` is every sample of the epochs needed for ``num_samples``. With order "neox" and
    ``first_num_samples`` (the sample count the run's order started from, below ``num_samples``), NeoX's order
    for ``first_num_samples`` is kept and extended epoch by epoch (sample_index.extend_order)."""

    def __init__(
        self,
        indexed: MMapIndexedDataset,
        name: str,
        doc_range: tuple[int, int],
        num_samples: int,
        seq_length: int,
        seed: int,
        cache_dir: Optional[str] = None,
        order: str = "stable",
        first_num_samples: Optional[int] = None,
    ):
        if order not in DATA_ORDERS:
            raise DataError(f"data-order {order!r}: expected one of {', '.join(DATA_ORDERS)}")
        self.indexed, self.name, self.seq_length, self.order = indexed, name, seq_length, order
        if order != "neox" or first_num_samples is None or int(first_num_samples) >= int(num_samples):
            first_num_samples = None
        self.doc_range = (int(doc_range[0]), int(doc_range[1]))
        start, end = self.doc_range
        if end <= start:
            raise DataError(f"{indexed.idx_path}: the {name} split has no documents")
        if int(indexed.sizes[start:end].sum(dtype=np.int64)) <= seq_length:
            raise DataError(
                f"{indexed.idx_path}: the {name} split has fewer than seq_length + 1 = {seq_length + 1} tokens"
            )
        self.cache_dir = _default_cache_dir(indexed, cache_dir)
        key = {
            "format": CACHE_FORMAT,
            "prefix": os.path.realpath(indexed.prefix),
            "files": [_file_stamp(indexed.bin_path), _file_stamp(indexed.idx_path)],
            "doc_range": list(self.doc_range),
            "seq_length": int(seq_length),
            "seed": int(seed),
            "num_samples": int(num_samples),
            "order": order,
        }
        if first_num_samples is not None:
            key["first_num_samples"] = int(first_num_samples)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        stem = f"{os.path.basename(indexed.prefix)}_{name}_{order}_{num_samples}ns_{seq_length}sl_{seed}s_{digest}"
        self.cache_stem = os.path.join(self.cache_dir, stem)
        self.cache_reused = self._load_cache(key)
        if not self.cache_reused:
            docs = np.arange(start, end, dtype=np.int64)
            if first_num_samples is not None:
                base = build_neox_order(indexed.sizes, docs, seq_length, seed, int(first_num_samples))
                order_arrays = extend_order(indexed.sizes, docs, seq_length, seed, base, num_samples)
            else:
                build = build_neox_order if order == "neox" else build_epoch_order
                order_arrays = build(indexed.sizes, docs, seq_length, seed, num_samples)
            self.doc_idx, self.sample_idx, self.shuffle_idx = order_arrays
            self._save_cache(key)
            log.info("built epoch order %s (%d samples)", self.cache_stem, len(self.shuffle_idx))
        else:
            log.info("reusing epoch order %s", self.cache_stem)

    # -- cache -----------------------------------------------------------------------------------
    def _paths(self):
        return {k: f"{self.cache_stem}_{k}.npy" for k in ("doc_idx", "sample_idx", "shuffle_idx")}

    def _load_cache(self, key) -> bool:
        meta = f"{self.cache_stem}_meta.json"
        try:
            with open(meta) as f:
                if json.load(f).get("key") != key:
                    return False
            arrays = {k: np.load(p, mmap_mode="r", allow_pickle=False) for k, p in self._paths().items()}
        except (OSError, ValueError):
            return False
        d, s, sh = arrays["doc_idx"], arrays["sample_idx"], arrays["shuffle_idx"]
        if s.ndim != 2 or s.shape[1] != 2 or len(sh) + 1 != len(s) or d.ndim != 1:
            return False
        self.doc_idx, self.sample_idx, self.shuffle_idx = d, s, sh
        return True

    def _save_cache(self, key) -> None:
        try:
            os.makedirs(self.cache_dir, exist_ok=True)
            arrays = {"doc_idx": self.doc_idx, "sample_idx": self.sample_idx, "shuffle_idx": self.shuffle_idx}
            for k, p in self._paths().items():
                tmp = _tmp_name(p)
                with open(tmp, "wb") as f:
                    np.save(f, arrays[k], allow_pickle=False)
                os.replace(tmp, p)
            _write_json_atomic(f"{self.cache_stem}_meta.json", {"key": key, "samples": int(len(self.shuffle_idx))})
        except OSError as e:  # a read-only data folder: work from memory
            log.warning("could not cache the epoch order in %s (%s); set data-cache-dir", self.cache_dir, e)

    # -- samples ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.shuffle_idx)

    def tokens(self, i: int) -> np.ndarray:
        """The seq_length + 1 token ids of sample i (int64)."""
        j = int(self.shuffle_idx[i])
        k0, o0 = (int(x) for x in self.sample_idx[j])
        k1, o1 = (int(x) for x in self.sample_idx[j + 1])
        if k0 == k1:
            out = self.indexed.get(int(self.doc_idx[k0]), o0, o1 - o0 + 1).astype(np.int64)
        else:
            parts = [self.indexed.get(int(self.doc_idx[k0]), o0)]
            parts += [self.indexed[int(self.doc_idx[k])] for k in range(k0 + 1, k1)]
            parts.append(self.indexed.get(int(self.doc_idx[k1]), 0, o1 + 1))
            out = np.concatenate(parts).astype(np.int64)
        return out

    def __getitem__(self, i: int) -> dict:
        return {"text": self.tokens(i)}


class BlendedDataset(torch.utils.data.Dataset):
    """``num_samples`` samples drawn from several datasets in proportion to ``weights`` (deterministic
    interleaving: each sample goes to the dataset furthest behind its share; ``order="neox"``: by GPT-NeoX's
    rule, see build_neox_blending_indices)."""

    def __init__(self, datasets: list, weights, num_samples: int, order: str = "stable"):
        w = np.asarray(weights, dtype=np.float64)
        self.datasets, self.weights = datasets, w / w.sum()
        if order == "neox":
            self.dataset_index, self.dataset_sample_index = build_neox_blending_indices(weights, num_samples)
        else:
            self.dataset_index, self.dataset_sample_index = build_blending_indices(self.weights, num_samples)
        for d, ds in enumerate(datasets):
            used = self.dataset_sample_index[self.dataset_index == d]
            if len(used) and int(used.max()) >= len(ds):
                raise DataError(f"blending: dataset {d} has {len(ds)} samples, {int(used.max()) + 1} needed")

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, i: int) -> dict:
        return self.datasets[int(self.dataset_index[i])][int(self.dataset_sample_index[i])]


# ------------------------------------------------------------------------------------------------
# from the config


def _as_list(x) -> list:
    if x is None:
        return []
    return [x] if isinstance(x, (str, os.PathLike)) else list(x)


def _weights(weights, paths: list, what: str) -> Optional[list]:
    weights = _as_list(weights)
    if not weights:
        return None
    if len(weights) != len(paths):
        raise DataError(f"{what}-data-weights has {len(weights)} entries for {len(paths)} {what}-data-paths")
    try:
        w = [float(x) for x in weights]
    except (TypeError, ValueError):
        raise DataError(f"{what}-data-weights {weights!r}: expected numbers") from None
    if any(x < 0 or not math.isfinite(x) for x in w) or sum(w) <= 0:
        raise DataError(f"{what}-data-weights {weights!r}: expected non-negative numbers with a positive sum")
    return w


def build_datasets(
    data_cfg,
    seq_length: int,
    seed: int,
    num_samples: dict,
    vocab_size: Optional[int] = None,
    vocab_stamp_min_bytes: Optional[int] = None,
    data_order: Optional[str] = None,
    first_num_samples: Optional[dict] = None,
) -> dict:
    """{"train": ds | None, "valid": ..., "test": ...} from a DataConfig (see the module docstring);
    every item is {"text": np.int64 array of seq_length + 1}. Raises DataError on any data problem.
    With ``vocab_size`` every token file is checked for ids outside [0, vocab_size) before anything is
    built; ``vocab_stamp_min_bytes`` overrides VOCAB_STAMP_MIN_BYTES (which files get a cached stamp).

    ``data_order`` (default: ``data_cfg.data_order``, "auto" meaning "stable" here: NeoXConfig.data_order decides
    it from the whole config): "stable" or "neox". With "neox" the datasets are built as GPT-NeoX builds them:
    each of several ``*-data-paths`` is asked for ceil(n * weight * 1.005) samples, the weights default to 1
    each (not to the token counts), a single path is that dataset alone, and a blend follows NeoX's rule;
    ``data-path`` + ``split`` ask each split for exactly n. ``first_num_samples`` ({"train": n0, ...}; "neox"
    only): the sample counts the run's order started from; a split asked for more keeps NeoX's order for n0 and
    extends it epoch by epoch, so a run resumed with a larger train-iters reads the same samples at the same
    steps as before (the counts per dataset are derived from n0 as from n)."""
    order = data_order or str(getattr(data_cfg, "data_order", "stable") or "stable")
    if order == "auto":
        order = "stable"
    if order not in DATA_ORDERS:
        raise DataError(f"data-order {order!r}: expected auto, {', '.join(DATA_ORDERS)}")
    if getattr(data_cfg, "data_impl", "mmap") != "mmap":
        raise DataError(f"data-impl {data_cfg.data_impl!r}: only 'mmap' (Megatron/NeoX .bin/.idx) is supported")
    if seq_length <= 0:
        raise DataError(f"seq-length {seq_length}: must be positive")
    cache_dir = getattr(data_cfg, "data_cache_dir", None)
    opened: dict[str, MMapIndexedDataset] = {}

    def open_indexed(prefix) -> MMapIndexedDataset:
        prefix = str(prefix)
        if prefix not in opened:
            ds = MMapIndexedDataset(prefix)
            if vocab_size is not None:
                rng, reused = cached_token_range(ds, cache_dir, vocab_stamp_min_bytes)
                if reused:
                    log.info("token range of %s from its stamp", ds.bin_path)
                ds.check_vocab(vocab_size, rng)
            opened[prefix] = ds
        return opened[prefix]

    # sources[split] = (list of (prefix, doc range or None for all), weights or None) or None
    sources: dict = {}
    explicit = bool(_as_list(data_cfg.train_data_paths))
    if explicit:
        for split in SPLITS:
            paths = [str(p) for p in _as_list(getattr(data_cfg, f"{split}_data_paths"))]
            w = _weights(getattr(data_cfg, f"{split}_data_weights"), paths, split)
            sources[split] = ([(p, None) for p in paths], w) if paths else None
    elif _as_list(data_cfg.data_path):
        fractions = parse_split(data_cfg.split)
        prefixes = [str(p) for p in _as_list(data_cfg.data_path)]
        ranges = {p: split_ranges(data_cfg.split, len(open_indexed(p))) for p in prefixes}
        for s, split in enumerate(SPLITS):
            if fractions[s] == 0:
                sources[split] = None
                continue
            parts = [(p, ranges[p][s]) for p in prefixes]
            if split == "test" and all(r[1] <= r[0] for _, r in parts):
                log.warning("split %r leaves no test documents in %s; no test set", data_cfg.split, prefixes)
                sources[split] = None
                continue
            sources[split] = (parts, None)
    else:
        raise DataError("no training data configured: set data-path or train-data-paths")

    out: dict = {}
    for split in SPLITS:
        n = int(num_samples.get(split, 0) or 0)
        src = sources.get(split)
        if src is None:
            if split == "train":
                raise DataError("no training data: train-data-paths is empty")
            out[split] = None
            continue
        if n <= 0 and split != "train":
            out[split] = None
            continue
        n = max(n, 1)
        parts, weights = src
        members, sizes = [], []
        for prefix, rng in parts:
            ds = open_indexed(prefix)
            rng = rng if rng is not None else (0, len(ds))
            if rng[1] <= rng[0]:
                raise DataError(
                    f"{ds.idx_path}: the {split} split ({data_cfg.split}) gets no documents of {len(ds)}; "
                    f"use more data or change split"
                )
            members.append((ds, rng))
            sizes.append(int(ds.sizes[rng[0] : rng[1]].sum(dtype=np.int64)))
        n0 = int((first_num_samples or {}).get(split, 0) or 0) or None
        if order == "neox" and explicit:
            out[split] = _neox_blend(members, weights, n, split, seq_length, seed, cache_dir, n0)
            continue
        if weights is None:
            weights = sizes  # proportional to tokens
        if len(members) == 1:
            ds, rng = members[0]
            out[split] = GPTDataset(ds, split, rng, n, seq_length, seed, cache_dir, order, n0)
            continue
        total = float(sum(weights))
        subsets = []
        for (ds, rng), w in zip(members, weights):
            need = int(math.ceil(w / total * n * 1.005)) + 1 if w > 0 else 1
            subsets.append(GPTDataset(ds, split, rng, need, seq_length, seed, cache_dir, order))
        out[split] = BlendedDataset(subsets, weights, n, order)
    return out


def _neox_blend(
    members: list,
    weights: Optional[list],
    n: int,
    split: str,
    seq_length: int,
    seed: int,
    cache_dir,
    n0: Optional[int] = None,
) -> torch.utils.data.Dataset:
    """One split of ``*-data-paths`` as GPT-NeoX builds it: weights default to 1 each and are normalised in Python
    floats; dataset d is asked for int(ceil(n * w_d * 1.005)) samples (its own index mappings, the same seed);
    one dataset is read directly (NeoX's blend of one dataset is the identity), several are blended."""
    weights = [1.0] * len(members) if weights is None else [float(w) for w in weights]
    total = sum(weights)
    norm = [w / total for w in weights]
    subsets = []
    for (ds, rng), w in zip(members, norm):
        need = int(math.ceil(n * w * NEOX_BLEND_FACTOR))
        first = int(math.ceil(n0 * w * NEOX_BLEND_FACTOR)) if n0 else None
        subsets.append(GPTDataset(ds, split, rng, need, seq_length, seed, cache_dir, "neox", first))
    if len(subsets) == 1:
        return subsets[0]
    return BlendedDataset(subsets, norm, n, "neox")
