"""Epoch order of a GPT dataset: document index, sample index, shuffle index (and blending indices).

    doc_idx     the documents of every epoch, in the order they are concatenated
    sample_idx  int64 [num_samples + 1, 2]: sample i starts at (position in doc_idx, token offset)
    shuffle_idx the order in which the samples are read

Two orders (the config key data-order):

- "stable" (build_epoch_order): epoch by epoch. Epoch 0's documents are shuffled by
  np.random.RandomState(seed), and the samples whose last token lies in epoch 0 are then shuffled by the
  same generator, which is GPT-NeoX's order when one epoch suffices. Epoch e >= 1 gets its own generators,
  seeded with (seed, 0, e) for its documents and (seed, 1, e) for its samples (the samples whose last
  token lies in epoch e). Nothing of an epoch depends on how many epochs follow it, so a run with more
  samples (a larger train-iters) starts with exactly the same samples in the same order: shuffle_idx of
  the smaller run is a prefix of the larger one's.
- "neox" (build_neox_order): GPT-NeoX's GPT2Dataset index mappings (_build_index_mappings). One
  np.random.RandomState(seed) first shuffles the documents of all epochs together (every document once
  per epoch, epoch after epoch, then one shuffle of the whole array), then shuffles all samples of all
  epochs. GPT-NeoX has no separate last-epoch shuffle (Megatron-LM's separate_last_epoch); neither has
  this. A change of the number of epochs (a larger train-iters) reorders everything, as in NeoX, unless
  the run is resumed with the sample count its order started from (extend_order: NeoX's order for that
  count, then further epochs added as in the stable order).

Samples are windows of seq_length + 1 tokens packed across documents (documents end with EOD; no
attention reset): sample i is global tokens i*seq_length ... i*seq_length + seq_length of the
documents concatenated in doc_idx order, so consecutive samples share one token (Megatron/NeoX).

build_sample_idx runs in C++ (kernels/csrc/sample_index.cpp, built by setup.py) when available, else
the numpy version below; both give identical arrays (tests/data/test_sample_index.py).

build_blending_indices likewise; its fallback is a plain Python loop, not vectorised: each sample's
dataset is the one furthest behind its share *given every earlier choice*, and for three or more
datasets we know no closed form that a vectorised version could reproduce bit for bit (orderings by a
fixed per-dataset key disagree with it on many samples). The loop takes a few tenths of a microsecond
a sample (0.3 us with three datasets in tools/bench_data.py), so when the C++ helper is missing and a
blend needs BLEND_FALLBACK_WARN_SAMPLES samples or more, a RuntimeWarning (once per process) says so
and how to build the helper.
"""

from __future__ import annotations

import warnings

import numpy as np

try:
    from neox_l2e.kernels import _sample_index as _cpp
except ImportError:  # the C++ helper was not built: numpy fallback
    _cpp = None

HAVE_CPP = _cpp is not None
BLEND_FALLBACK_WARN_SAMPLES = 10_000_000
REBUILD_HINT = "pip install --no-build-isolation -e . (needs pybind11 and a C++ compiler)"
_warned_blend_fallback = False


def build_sample_idx_numpy(sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int, num_samples: int) -> np.ndarray:
    """Row i = (k, p - start[k]) for p = i*seq_length, k the largest index with start[k] <= p, where
    start[k] is the number of tokens in documents doc_idx[:k]. Same definition as the C++ version."""
    if seq_length <= 0 or num_samples < 0:
        raise ValueError("seq_length must be positive and num_samples >= 0")
    lengths = np.asarray(sizes)[np.asarray(doc_idx, dtype=np.int64)].astype(np.int64)
    starts = np.concatenate(([0], np.cumsum(lengths)))  # starts[k] = tokens before doc_idx[k]; starts[-1] = total
    positions = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    if num_samples >= 0 and positions[-1] >= starts[-1]:
        raise ValueError("not enough tokens in doc_idx for num_samples")
    k = np.searchsorted(starts, positions, side="right") - 1  # skips empty documents like the C++ loop
    out = np.empty((num_samples + 1, 2), dtype=np.int64)
    out[:, 0] = k
    out[:, 1] = positions - starts[k]
    return out


def build_sample_idx(sizes, doc_idx, seq_length: int, num_samples: int, use_cpp: bool | None = None) -> np.ndarray:
    """The sample index, by the C++ helper when built (``use_cpp=None``), else by numpy."""
    if use_cpp is None:
        use_cpp = HAVE_CPP
    if use_cpp:
        if _cpp is None:
            raise RuntimeError("the C++ sample-index helper (neox_l2e.kernels._sample_index) is not built")
        try:
            return _cpp.build_sample_idx(
                np.ascontiguousarray(sizes, dtype=np.int32),
                np.ascontiguousarray(doc_idx, dtype=np.int64),
                int(seq_length),
                int(num_samples),
            )
        except IndexError as e:  # std::out_of_range arrives as IndexError
            raise ValueError(str(e)) from None
    return build_sample_idx_numpy(sizes, doc_idx, seq_length, num_samples)


def build_blending_indices_numpy(weights, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample i goes to the dataset furthest behind its share: argmax_d weights[d]*(i+1) - taken[d]
    (first on ties). A plain loop over Python floats (IEEE doubles, the same operations as the C++
    version, so identical results); the C++ version is the fast one."""
    w = [float(x) for x in np.asarray(weights, dtype=np.float64).reshape(-1)]
    if not w:
        raise ValueError("need at least one weight")
    return _blend_loop(w, int(num_samples), offset=1)


def _blend_loop(w: list, num_samples: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """The greedy blending loop: sample i goes to argmax_d w[d] * n_i - taken[d] (first on ties), n_i = i + offset
    for i > 0 and 1 for i = 0 (offset 1: ours, n_i = i + 1; offset 0: GPT-NeoX's max(i, 1))."""
    taken = [0] * len(w)
    dataset_index = np.empty(num_samples, dtype=np.int16)  # filled in place: 10 bytes a sample
    dataset_sample_index = np.empty(num_samples, dtype=np.int64)
    w0, others = w[0], range(1, len(w))
    for i in range(num_samples):
        n = float(i + offset) if i else 1.0
        best, best_err = 0, w0 * n - taken[0]
        for j in others:
            err = w[j] * n - taken[j]
            if err > best_err:
                best, best_err = j, err
        dataset_index[i] = best
        dataset_sample_index[i] = taken[best]
        taken[best] += 1
    return dataset_index, dataset_sample_index


def build_blending_indices(weights, num_samples: int, use_cpp: bool | None = None):
    """(int16 dataset index, int64 sample index within that dataset) of each blended sample, by the C++
    helper when built (``use_cpp=None``), else by the Python loop (warning once at large sizes)."""
    global _warned_blend_fallback
    if use_cpp is None:
        use_cpp = HAVE_CPP
        if not use_cpp and num_samples >= BLEND_FALLBACK_WARN_SAMPLES and not _warned_blend_fallback:
            _warned_blend_fallback = True
            warnings.warn(
                f"blending {num_samples:,} samples without the C++ helper (neox_l2e.kernels._sample_index "
                f"is not built): the Python fallback takes a few tenths of a microsecond a sample; "
                f"build the helper with "
                f"{REBUILD_HINT}",
                RuntimeWarning,
                stacklevel=2,
            )
    if use_cpp:
        if _cpp is None:
            raise RuntimeError("the C++ blending helper (neox_l2e.kernels._sample_index) is not built")
        return _cpp.build_blending_indices(np.ascontiguousarray(weights, dtype=np.float64), int(num_samples))
    return build_blending_indices_numpy(weights, num_samples)


def num_epochs_needed(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Fewest epochs whose tokens give num_samples windows ((epochs*tokens - 1) // seq_length)."""
    if tokens_per_epoch <= 0:
        raise ValueError("no tokens")
    need = num_samples * seq_length + 1
    return max(1, -(-need // tokens_per_epoch))


def _seeded(seed: int, stream: int, epoch: int) -> np.random.RandomState:
    return np.random.RandomState([int(seed) % (1 << 32), stream, epoch])


def build_epoch_order(
    sizes: np.ndarray, documents: np.ndarray, seq_length: int, seed: int, num_samples: int, use_cpp: bool | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(doc_idx, sample_idx, shuffle_idx) of the "stable" order for at least ``num_samples`` samples of
    ``documents`` (indices into ``sizes``): every full window of the epochs needed, each epoch shuffled on its
    own (see the module docstring), so the arrays for more samples extend those for fewer."""
    documents = np.asarray(documents, dtype=np.int64)
    tokens_per_epoch = int(np.asarray(sizes)[documents].sum(dtype=np.int64))
    epochs = num_epochs_needed(tokens_per_epoch, seq_length, max(1, num_samples))
    first = np.random.RandomState(seed)
    perms = [first.permutation(len(documents))] + [
        _seeded(seed, 0, e).permutation(len(documents)) for e in range(1, epochs)
    ]
    doc_idx = np.concatenate([documents[p] for p in perms])
    total = (epochs * tokens_per_epoch - 1) // seq_length  # every full window of those epochs
    sample_idx = build_sample_idx(sizes, doc_idx, seq_length, total, use_cpp=use_cpp)
    # window i ends at token i*seq_length + seq_length; it belongs to the epoch holding that token
    ends = np.arange(1, total + 1, dtype=np.int64) * seq_length
    bounds = np.searchsorted(ends, np.arange(1, epochs + 1, dtype=np.int64) * tokens_per_epoch, side="left")
    shuffle_idx = np.empty(total, dtype=np.int64)
    lo = 0
    for e, hi in enumerate(bounds):
        hi = int(hi)
        rng = first if e == 0 else _seeded(seed, 1, e)
        shuffle_idx[lo:hi] = lo + rng.permutation(hi - lo)
        lo = hi
    return doc_idx, sample_idx, shuffle_idx


def build_neox_order(
    sizes: np.ndarray, documents: np.ndarray, seq_length: int, seed: int, num_samples: int, use_cpp: bool | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(doc_idx, sample_idx, shuffle_idx) as GPT-NeoX's GPT2Dataset builds them for ``num_samples`` samples of
    ``documents`` with ``seed`` (same values; int64 here where NeoX stores int32 / uint32):

    - epochs: the fewest E with (E * tokens_per_epoch - 1) // seq_length >= num_samples;
    - rng = np.random.RandomState(seed); doc_idx = ``documents`` repeated E times (epoch after epoch), then
      rng.shuffle over the whole array;
    - sample_idx: row 0 is (0, 0); row i is where token i*seq_length lies, skipping empty documents (NeoX's
      build_sample_idx), for every full window of the E epochs;
    - shuffle_idx = rng.shuffle(arange(number of windows)), the same rng, after doc_idx.
    """
    documents = np.asarray(documents, dtype=np.int64)
    tokens_per_epoch = int(np.asarray(sizes)[documents].sum(dtype=np.int64))
    epochs = num_epochs_needed(tokens_per_epoch, seq_length, num_samples)
    rng = np.random.RandomState(seed)
    doc_idx = np.tile(documents, epochs)
    rng.shuffle(doc_idx)
    total = (epochs * tokens_per_epoch - 1) // seq_length
    sample_idx = build_sample_idx(sizes, doc_idx, seq_length, total, use_cpp=use_cpp)
    sample_idx[0] = (0, 0)  # NeoX starts at the first entry even when that document is empty
    shuffle_idx = np.arange(total, dtype=np.int64)
    rng.shuffle(shuffle_idx)
    return doc_idx, sample_idx, shuffle_idx


def build_neox_blending_indices(weights, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """GPT-NeoX's BlendableDataset indices: sample i goes to the dataset with the largest
    weights[d] * max(i, 1) - taken[d] (first on ties), the weights normalised as NeoX does (once in Python floats
    by the data utilities, once more in numpy by the dataset). A plain Python loop (a few tenths of a
    microsecond a sample); one dataset needs none (every sample is its own)."""
    w = [float(x) for x in np.asarray(weights, dtype=np.float64).reshape(-1)]
    total = sum(w)
    w = np.array([x / total for x in w], dtype=np.float64)
    w = [float(x) for x in w / np.sum(w)]
    return _blend_loop(w, int(num_samples), offset=0)


def extend_order(
    sizes: np.ndarray,
    documents: np.ndarray,
    seq_length: int,
    seed: int,
    base: tuple,
    num_samples: int,
    use_cpp: bool | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An order for at least ``num_samples`` samples that begins with ``base`` = (doc_idx, sample_idx,
    shuffle_idx) of whole epochs of ``documents`` (such as NeoX's order for a run's first train-iters): base's
    samples keep their positions, and every further epoch e is added as in the stable order (documents shuffled
    by the generator seeded (seed, 0, e), the samples whose last token lies in epoch e by (seed, 1, e)). Returns
    ``base`` itself when it already holds ``num_samples``."""
    doc_idx0, sample_idx0, shuffle_idx0 = base
    documents = np.asarray(documents, dtype=np.int64)
    total0 = len(shuffle_idx0)
    if num_samples <= total0:
        return base
    tokens_per_epoch = int(np.asarray(sizes)[documents].sum(dtype=np.int64))
    epochs0 = len(doc_idx0) // len(documents)
    epochs = num_epochs_needed(tokens_per_epoch, seq_length, num_samples)
    doc_idx = np.concatenate(
        [np.asarray(doc_idx0, dtype=np.int64)]
        + [documents[_seeded(seed, 0, e).permutation(len(documents))] for e in range(epochs0, epochs)]
    )
    total = (epochs * tokens_per_epoch - 1) // seq_length
    sample_idx = build_sample_idx(sizes, doc_idx, seq_length, total, use_cpp=use_cpp)
    sample_idx[: len(sample_idx0)] = sample_idx0
    ends = np.arange(1, total + 1, dtype=np.int64) * seq_length
    bounds = np.searchsorted(ends, np.arange(epochs0 + 1, epochs + 1, dtype=np.int64) * tokens_per_epoch, side="left")
    shuffle_idx = np.empty(total, dtype=np.int64)
    shuffle_idx[:total0] = shuffle_idx0
    lo = total0
    for e, hi in zip(range(epochs0, epochs), bounds):
        hi = int(hi)
        shuffle_idx[lo:hi] = lo + _seeded(seed, 1, e).permutation(hi - lo)
        lo = hi
    return doc_idx, sample_idx, shuffle_idx
