"""Sample index: the C++ helper and the numpy fallback give identical arrays, and both match the
definition (sample i = global tokens i*seq .. i*seq + seq of the documents in doc_idx order)."""

import importlib.util

import numpy as np
import pytest

from neox_l2e.data import sample_index as si

REBUILD = "pip install --no-build-isolation -e ."


def require_cpp(have_cpp=None, pybind11_installed=None):
    """The C++ helper must be there whenever it could have been built: setup.py ignores build failures
    (the numpy fallback serves users without a compiler), so a broken build would otherwise only show
    as skipped tests. Without pybind11 nothing was built: skip."""
    have_cpp = si.HAVE_CPP if have_cpp is None else have_cpp
    if have_cpp:
        return
    if pybind11_installed is None:
        pybind11_installed = importlib.util.find_spec("pybind11") is not None
    if pybind11_installed:
        pytest.fail(
            "pybind11 is installed but the C++ helper neox_l2e.kernels._sample_index is not built (setup.py "
            f"ignores build failures); rebuild it with `{REBUILD}` and read its compiler errors",
            pytrace=False,
        )
    pytest.skip(f"pybind11 not installed: the C++ helper was not built (install pybind11, then `{REBUILD}`)")


def test_missing_cpp_helper_fails_when_it_could_be_built():
    require_cpp(have_cpp=True, pybind11_installed=True)
    with pytest.raises(pytest.fail.Exception, match=r"rebuild it with `pip install --no-build-isolation -e \.`"):
        require_cpp(have_cpp=False, pybind11_installed=True)
    with pytest.raises(pytest.skip.Exception, match="pybind11 not installed"):
        require_cpp(have_cpp=False, pybind11_installed=False)


def random_case(rng):
    n = int(rng.integers(1, 40))
    sizes = rng.integers(0, 25, n).astype(np.int32)
    sizes[int(rng.integers(0, n))] += 1  # at least one token
    epochs = int(rng.integers(1, 3))
    doc_idx = np.concatenate([rng.permutation(n) for _ in range(epochs)]).astype(np.int64)
    seq = int(rng.integers(1, 17))
    total = int(sizes[doc_idx].astype(np.int64).sum())
    return sizes, doc_idx, seq, (total - 1) // seq


def test_cpp_equals_numpy_random():
    require_cpp()
    rng = np.random.default_rng(1234)
    for _ in range(300):
        sizes, doc_idx, seq, ns = random_case(rng)
        a = si.build_sample_idx(sizes, doc_idx, seq, ns, use_cpp=True)
        b = si.build_sample_idx(sizes, doc_idx, seq, ns, use_cpp=False)
        assert a.dtype == b.dtype == np.int64
        np.testing.assert_array_equal(a, b)


def test_cpp_equals_numpy_large_and_both_refuse_too_many_samples():
    require_cpp()
    rng = np.random.default_rng(7)
    sizes = rng.integers(1, 3000, 50_000).astype(np.int32)
    doc_idx = rng.permutation(len(sizes)).astype(np.int64)
    ns = (int(sizes.sum()) - 1) // 2048
    np.testing.assert_array_equal(
        si.build_sample_idx(sizes, doc_idx, 2048, ns, use_cpp=True),
        si.build_sample_idx(sizes, doc_idx, 2048, ns, use_cpp=False),
    )
    for use_cpp in (True, False):
        with pytest.raises(ValueError, match="not enough tokens"):
            si.build_sample_idx(sizes, doc_idx, 2048, ns + 1, use_cpp=use_cpp)


def test_blending_cpp_equals_numpy():
    require_cpp()
    for w in ([0.5, 0.3, 0.2], [1.0], [0.1, 0.0, 0.9], [1 / 3, 1 / 3, 1 / 3]):
        a = si.build_blending_indices(w, 2000, use_cpp=True)
        b = si.build_blending_indices(w, 2000, use_cpp=False)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
        counts = np.bincount(a[0], minlength=len(w))
        assert np.all(np.abs(counts - np.asarray(w) * 2000) <= 1)
    rng = np.random.default_rng(5)
    for d in (2, 3, 7, 20):  # random and tie-prone (small integer) weights, normalised or not, longer runs
        for w in (rng.random(d), rng.integers(1, 4, d).astype(float), np.full(d, 1 / d)):
            a = si.build_blending_indices(w, 50_000, use_cpp=True)
            b = si.build_blending_indices(w, 50_000, use_cpp=False)
            assert a[0].dtype == b[0].dtype == np.int16 and a[1].dtype == b[1].dtype == np.int64
            np.testing.assert_array_equal(a[0], b[0])
            np.testing.assert_array_equal(a[1], b[1])


def test_blending_fallback_warns_once_at_large_sizes(monkeypatch):
    import warnings

    w = [0.6, 0.4]
    expected = si.build_blending_indices_numpy(w, 50)
    monkeypatch.setattr(si, "HAVE_CPP", False)
    monkeypatch.setattr(si, "_cpp", None)
    monkeypatch.setattr(si, "_warned_blend_fallback", False)
    monkeypatch.setattr(si, "BLEND_FALLBACK_WARN_SAMPLES", 50)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        small = si.build_blending_indices(w, 49)
        assert caught == []
        first = si.build_blending_indices(w, 50)
        si.build_blending_indices(w, 60)
    assert len(caught) == 1 and caught[0].category is RuntimeWarning
    assert "blending 50 samples without the C++ helper" in str(caught[0].message)
    assert "pip install --no-build-isolation -e ." in str(caught[0].message)
    np.testing.assert_array_equal(first[0], expected[0])
    np.testing.assert_array_equal(small[1], expected[1][:49])


@pytest.mark.parametrize("use_cpp", [False, True])
def test_sample_index_matches_definition(use_cpp):
    if use_cpp:
        require_cpp()
    rng = np.random.default_rng(99)
    for _ in range(100):
        sizes, doc_idx, seq, ns = random_case(rng)
        # documents with distinct token values so a window identifies its source positions
        docs = []
        start = 0
        for s in sizes:
            docs.append(np.arange(start, start + s))
            start += s
        stream = np.concatenate([docs[d] for d in doc_idx])
        idx = si.build_sample_idx(sizes, doc_idx, seq, ns, use_cpp=use_cpp)
        assert idx.shape == (ns + 1, 2)
        for i in range(ns):
            (k0, o0), (k1, o1) = idx[i], idx[i + 1]
            pieces = [docs[doc_idx[k0]][o0:]] + [docs[doc_idx[k]] for k in range(k0 + 1, k1)]
            if k1 > k0:
                pieces.append(docs[doc_idx[k1]][: o1 + 1])
            else:
                pieces = [docs[doc_idx[k0]][o0 : o1 + 1]]
            window = np.concatenate(pieces)
            np.testing.assert_array_equal(window, stream[i * seq : i * seq + seq + 1])
