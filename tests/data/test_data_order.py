"""The sample order: GPT-NeoX's index mappings ("neox", checked against a reference written in this file from
NeoX's algorithm) and the project's "stable" order (a larger train-iters keeps every earlier sample in place)."""

import math

import numpy as np
import pytest

from neox_l2e.data import build_datasets, build_epoch_order, build_neox_order, write_indexed_dataset
from neox_l2e.data.sample_index import build_neox_blending_indices

# ---- reference: GPT-NeoX's GPT2Dataset._build_index_mappings, from its description ---------------------------


def ref_epochs(tokens_per_epoch, seq_length, num_samples):
    """Add epochs until (tokens - 1) // seq_length windows cover num_samples."""
    epochs, tokens = 0, 0
    while True:
        epochs += 1
        tokens += tokens_per_epoch
        if (tokens - 1) // seq_length >= num_samples:
            return epochs


def ref_sample_idx(sizes, doc_idx, seq_length, windows):
    """Walk the documents: each window needs seq_length + 1 tokens; the next one starts on the last token of the
    previous (that token is counted again). Row 0 is (0, 0); a row is (position in doc_idx, offset)."""
    rows = [(0, 0)]
    k, offset = 0, 0
    while len(rows) <= windows:
        need = seq_length + 1
        while need != 0:
            left = int(sizes[doc_idx[k]]) - offset
            need -= left
            if need <= 0:
                offset += need + left - 1
                need = 0
            else:
                k += 1
                offset = 0
        rows.append((k, offset))
    return np.array(rows, dtype=np.int64)


def ref_neox(sizes, documents, seq_length, seed, num_samples):
    documents = np.asarray(documents, dtype=np.int32)
    tokens_per_epoch = int(np.sum(sizes[documents]))
    epochs = ref_epochs(tokens_per_epoch, seq_length, num_samples)
    rng = np.random.RandomState(seed=seed)
    doc_idx = np.zeros((epochs, len(documents)), dtype=np.int32)
    doc_idx[:] = documents  # every document once per epoch, epoch after epoch
    doc_idx = doc_idx.reshape(-1)
    rng.shuffle(doc_idx)  # one shuffle of all epochs together
    windows = (epochs * tokens_per_epoch - 1) // seq_length
    sample_idx = ref_sample_idx(sizes, doc_idx, seq_length, windows)
    shuffle_idx = np.arange(windows, dtype=np.uint32)
    rng.shuffle(shuffle_idx)  # the same generator, after the documents
    return doc_idx, sample_idx, shuffle_idx


def ref_tokens(bin_tokens, starts, sizes, doc_idx, sample_idx, shuffle_idx, i):
    """Sample i's seq_length + 1 tokens, read from the flat token array."""
    j = int(shuffle_idx[i])
    (k0, o0), (k1, o1) = sample_idx[j], sample_idx[j + 1]
    parts = []
    for k in range(k0, k1 + 1):
        d = int(doc_idx[k])
        lo = o0 if k == k0 else 0
        hi = o1 + 1 if k == k1 else int(sizes[d])
        parts.append(bin_tokens[starts[d] + lo : starts[d] + hi])
    return np.concatenate(parts)


def ref_blend(weights, n):
    w = [x / sum(weights) for x in weights]
    taken, out = [0] * len(w), []
    for i in range(n):
        errors = [wd * max(i, 1) - taken[d] for d, wd in enumerate(w)]
        d = errors.index(max(errors))
        out.append((d, taken[d]))
        taken[d] += 1
    return out


def _sizes(seed, n_docs, seq_length):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 3 * seq_length, n_docs).astype(np.int32)
    sizes[rng.choice(n_docs, 3, replace=False)] = 0  # empty documents
    sizes[rng.choice(n_docs, 3, replace=False)] = seq_length + 1  # exactly one window
    sizes[rng.choice(n_docs, 2, replace=False)] = 1
    return sizes


@pytest.mark.parametrize("seed", [1234, 7])
@pytest.mark.parametrize("seq_length", [8, 13])
def test_neox_order_equals_reference(seed, seq_length):
    sizes = _sizes(seed, 60, seq_length)
    for documents in (np.arange(60), np.arange(5, 47)):  # a whole dataset, a split's range
        tokens = int(sizes[documents].sum())
        per_epoch = (tokens - 1) // seq_length
        # one epoch, exactly at an epoch's end, into a second and a third epoch, and 0 samples
        for num_samples in (1, per_epoch // 2, per_epoch, per_epoch + 1, 2 * per_epoch + 5, 0):
            got = build_neox_order(sizes, documents, seq_length, seed, num_samples)
            want = ref_neox(sizes, documents, seq_length, seed, num_samples)
            for name, g, w in zip(("doc_idx", "sample_idx", "shuffle_idx"), got, want):
                assert g.shape == w.shape and np.array_equal(g, w.astype(np.int64)), (name, num_samples)


def test_neox_order_first_document_empty():
    sizes = np.array([0, 5, 9, 0, 7, 4], dtype=np.int32)
    for seed in range(20):  # some seeds shuffle an empty document to the front
        got_all, want_all = build_neox_order(sizes, np.arange(6), 4, seed, 9), ref_neox(sizes, np.arange(6), 4, seed, 9)
        for got, want in zip(got_all, want_all):
            assert np.array_equal(got, want.astype(np.int64)), seed


def _write(tmp_path, name, n_docs, seed, vocab=500):
    rng = np.random.default_rng(seed)
    docs = [list(rng.integers(1, vocab, int(rng.integers(1, 40)))) + [0] for _ in range(n_docs)]
    prefix = write_indexed_dataset(str(tmp_path / name), docs, vocab_size=vocab)
    flat = np.concatenate([np.asarray(d, dtype=np.int64) for d in docs])
    sizes = np.array([len(d) for d in docs], dtype=np.int32)
    return prefix, flat, sizes, np.concatenate(([0], np.cumsum(sizes)))


def test_neox_samples_from_train_data_paths_and_data_path(tmp_path, data_config):
    """The samples a run reads with data-order neox are NeoX's: one train-data-path is asked for
    ceil(n * 1.005) samples (NeoX's blend factor, which can add an epoch); data-path + split for exactly n."""
    seq, seed = 16, 1234
    prefix, flat, sizes, starts = _write(tmp_path, "a", 80, 0)
    per_epoch = (int(sizes.sum()) - 1) // seq
    n = per_epoch  # one epoch holds n, but ceil(n * 1.005) needs two
    assert math.ceil(n * 1.005) > per_epoch
    ds = build_datasets(
        data_config(train_data_paths=[prefix], data_cache_dir=str(tmp_path / "c")),
        seq,
        seed,
        {"train": n},
        data_order="neox",
    )["train"]
    ref = ref_neox(sizes, np.arange(80), seq, seed, math.ceil(n * 1.005))
    assert len(ref[0]) == 2 * 80
    for i in range(n):
        assert np.array_equal(ds[i]["text"], ref_tokens(flat, starts, sizes, *ref, i)), i
    # data-path with split 90,10,0: train = documents [0, 72), num_samples exactly n
    ds = build_datasets(
        data_config(data_path=prefix, split="90,10,0", data_cache_dir=str(tmp_path / "c")),
        seq,
        seed,
        {"train": 50, "valid": 5},
        data_order="neox",
    )
    ref = ref_neox(sizes, np.arange(72), seq, seed, 50)
    for i in range(50):
        assert np.array_equal(ds["train"][i]["text"], ref_tokens(flat, starts, sizes, *ref, i)), i
    ref = ref_neox(sizes, np.arange(72, 80), seq, seed, 5)
    for i in range(5):
        assert np.array_equal(ds["valid"][i]["text"], ref_tokens(flat, starts, sizes, *ref, i)), i


def test_neox_blend_of_two_paths(tmp_path, data_config):
    seq, seed, n = 8, 99, 300
    a = _write(tmp_path, "a", 40, 1)
    b = _write(tmp_path, "b", 30, 2)
    assert [tuple(x) for x in zip(*build_neox_blending_indices([3.0, 1.0], 500))] == ref_blend([3.0, 1.0], 500)
    cfg = data_config(train_data_paths=[a[0], b[0]], train_data_weights=[3, 1], data_cache_dir=str(tmp_path / "c"))
    ds = build_datasets(cfg, seq, seed, {"train": n}, data_order="neox")["train"]
    refs = [
        ref_neox(x[2], np.arange(len(x[2])), seq, seed, math.ceil(n * w * 1.005)) for x, w in ((a, 0.75), (b, 0.25))
    ]
    for i, (d, j) in enumerate(ref_blend([3.0, 1.0], n)):
        _, flat, sizes, starts = (a, b)[d]
        assert np.array_equal(ds[i]["text"], ref_tokens(flat, starts, sizes, *refs[d], j)), i
    # without weights NeoX weighs the paths equally (not by tokens)
    ds = build_datasets(
        data_config(train_data_paths=[a[0], b[0]], data_cache_dir=str(tmp_path / "c")),
        seq,
        seed,
        {"train": 20},
        data_order="neox",
    )["train"]
    assert [int(x) for x in ds.dataset_index[:6]] == [d for d, _ in ref_blend([1.0, 1.0], 6)]


# ---- the stable order ----------------------------------------------------------------------------------------


def test_stable_order_keeps_earlier_samples_when_train_iters_grows(tmp_path, data_config):
    """A run extended so that one (or two) more epochs are needed reads the same samples at the same positions
    for everything the shorter run had (the shorter run's whole order is a prefix of the longer one's)."""
    sizes = _sizes(3, 50, 8)
    per_epoch = (int(sizes.sum()) - 1) // 8
    small = build_epoch_order(sizes, np.arange(50), 8, 1234, per_epoch - 3)  # one epoch
    for more in (per_epoch + 2, 2 * per_epoch + 7):
        big = build_epoch_order(sizes, np.arange(50), 8, 1234, more)
        assert len(big[0]) > len(small[0])
        for s_arr, b_arr in zip(small, big):
            assert np.array_equal(b_arr[: len(s_arr)], s_arr)
    two = build_epoch_order(sizes, np.arange(50), 8, 1234, per_epoch + 2)
    three = build_epoch_order(sizes, np.arange(50), 8, 1234, 2 * per_epoch + 7)
    for a, b in zip(two, three):
        assert np.array_equal(b[: len(a)], a)
    # a permutation of every window; every epoch's windows are read before the next epoch's
    sh = three[2]
    assert np.array_equal(np.sort(sh), np.arange(len(sh)))
    epoch_of = ((sh.astype(np.int64) + 1) * 8) // int(sizes.sum())
    assert np.all(np.diff(epoch_of) >= 0)
    # with one epoch the stable order is NeoX's
    for got, want in zip(small, build_neox_order(sizes, np.arange(50), 8, 1234, per_epoch - 3)):
        assert np.array_equal(got, want)

    # through build_datasets, as train-iters grows: the first samples are the same tokens
    prefix, *_ = _write(tmp_path, "d", 60, 5)
    cfg = data_config(train_data_paths=[prefix], data_cache_dir=str(tmp_path / "c"))
    first = build_datasets(cfg, 16, 1234, {"train": 40}, data_order="stable")["train"]
    epoch_samples = len(first)
    later = build_datasets(cfg, 16, 1234, {"train": epoch_samples + 40}, data_order="stable")["train"]
    assert len(later) > epoch_samples
    for i in range(epoch_samples):
        assert np.array_equal(first[i]["text"], later[i]["text"]), i


def test_data_order_default_follows_the_config():
    from pathlib import Path

    from neox_l2e.config import load_config

    root = Path(__file__).resolve().parents[2]
    from neox_l2e.config import ConfigError

    published = root.parent / "shared" / "data" / "pythia-configs"  # the real Pythia ymls, when present
    pythia = sorted((root / "configs/pythia").glob("*.yml")) + sorted(published.glob("*.yml"))
    checked = 0
    for path in pythia:
        try:
            cfg = load_config([str(path)], {})
        except ConfigError:  # the two published files with errors (tests/config)
            continue
        assert cfg.data_order == "neox", path.name
        checked += 1
    assert checked >= 10
    assert load_config([str(root / "configs/local/tiny.yml")], {}).data_order == "stable"
    assert load_config([str(root / "configs/local/tiny.yml")], {"pipe_parallel_size": 1}).data_order == "neox"
    assert load_config([str(root / "configs/pythia/pythia-70m.yml")], {"data_order": "stable"}).data_order == "stable"
    assert load_config([str(root / "configs/local/tiny.yml")], {"data_order": "neox"}).data_order == "neox"
    with pytest.raises(
        ConfigError, match="<override>: data-order: 'random' is not supported; use one of auto, stable, neox"
    ):
        load_config([str(root / "configs/local/tiny.yml")], {"data_order": "random"})


def test_deepy_hands_the_decided_order_to_its_ranks():
    """Ranks started by deepy.py get the resolved config, where every key looks set: deepy.py decides "auto"."""
    import base64
    import json
    import subprocess
    import sys
    from pathlib import Path

    from distributed import clean_env

    root = Path(__file__).resolve().parents[2]
    for cfg, want in (("configs/pythia/pythia-14m.yml", "neox"), ("configs/local/tiny.yml", "stable")):
        p = subprocess.run(
            [sys.executable, str(root / "deepy.py"), "--dry-run", "--num_gpus", "1", "train.py", str(root / cfg)],
            env=clean_env(PYTHONPATH=str(root)),
            capture_output=True,
            text=True,
            timeout=120,
            cwd=root,
        )
        assert p.returncode == 0, p.stderr[-2000:]
        cmd = p.stdout.strip().split()
        assert json.loads(base64.b64decode(cmd[cmd.index("--config-b64") + 1]))["data_order"] == want, cfg


def test_neox_order_extended_from_the_first_run_keeps_its_samples(tmp_path, data_config):
    """data-order neox, resumed with a larger train-iters that needs more epochs: with the first run's sample
    count (first_num_samples) every sample of NeoX's first order stays at its position; without it NeoX itself
    reorders everything."""
    from neox_l2e.data.sample_index import extend_order

    sizes = _sizes(4, 40, 8)
    per_epoch = (int(sizes.sum()) - 1) // 8
    for n0, n in ((per_epoch - 2, per_epoch + 3), (per_epoch + 3, 3 * per_epoch + 1)):
        base = build_neox_order(sizes, np.arange(40), 8, 1234, n0)
        ext = extend_order(sizes, np.arange(40), 8, 1234, base, n)
        assert len(ext[2]) >= n > len(base[2])
        for b, e in zip(base, ext):
            assert np.array_equal(e[: len(b)], b)
        assert np.array_equal(np.sort(ext[2]), np.arange(len(ext[2])))
        epochs = len(ext[0]) // 40
        # NeoX's epochs mix; the added ones are whole epochs
        assert all(
            np.array_equal(np.sort(ext[0][k * 40 : (k + 1) * 40]), np.arange(40))
            for k in range(len(base[0]) // 40, epochs)
        )
        assert not np.array_equal(build_neox_order(sizes, np.arange(40), 8, 1234, n)[2][:50], base[2][:50])
    # through build_datasets: one train path (NeoX's 1.005 factor applied to both counts)
    prefix, *_ = _write(tmp_path, "e", 50, 6)
    cfg = data_config(train_data_paths=[prefix], data_cache_dir=str(tmp_path / "c"))
    first = build_datasets(cfg, 16, 1234, {"train": 30}, data_order="neox")["train"]
    later = build_datasets(
        cfg, 16, 1234, {"train": 3 * len(first)}, data_order="neox", first_num_samples={"train": 30}
    )["train"]
    assert len(later) > len(first)
    for i in range(len(first)):
        assert np.array_equal(first[i]["text"], later[i]["text"]), i
    again = build_datasets(
        cfg, 16, 1234, {"train": 3 * len(first)}, data_order="neox", first_num_samples={"train": 30}
    )["train"]
    assert again.cache_reused and np.array_equal(again.shuffle_idx, later.shuffle_idx)
