"""The C++ sweep of the CPU torch path (kernels/csrc/l2e_scan.cpp) against the torch sweep it replaces
(functional._sweep_blocks): the same candidates, d and phi bit for bit, the same column sums up to summation order,
whatever the thread count; and ``scan`` gives the same selection either way."""

import importlib.util
import math

import pytest
import torch

from neox_l2e.l2e import functional as F


def _require_cpp():
    """Built whenever it could be: setup.py ignores build failures (the torch sweep serves users without a
    compiler), so a broken build would otherwise only show as skipped tests."""
    if F._cpp_scan is not None:
        return F._cpp_scan
    if importlib.util.find_spec("pybind11") is not None:
        pytest.fail(
            "pybind11 is installed but neox_l2e.kernels._l2e_scan is not built (setup.py ignores build failures); "
            "rebuild it with `pip install --no-build-isolation -e .` and read its compiler errors"
        )
    pytest.skip("pybind11 not installed: the C++ sweep was not built")


def _data(T, N, seed, nan=False):
    g = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.gelu(torch.randn(T, N, generator=g) * 0.8)
    mean = z.mean(0) + 0.05 * torch.randn(N, generator=g)
    inv_var = 1.0 / (z.var(0, correction=0) + 1e-3)
    inv_var[::5] = 0.0  # ineligible neurons: phi = 0, never selected
    if nan and N > 1:
        z[0, 1] = float("nan")  # NaN >= bound is False on both sides
    return z, mean, inv_var


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (33, 8), (100, 257), (517, 64)])
@pytest.mark.parametrize("threads", [1, 3])
def test_cpp_sweep_equals_the_torch_sweep(shape, threads, monkeypatch):
    _require_cpp()
    z, mean, inv_var = _data(*shape, seed=shape[0] * 31 + shape[1], nan=True)
    phi = F.phi(z, mean, inv_var)
    finite = phi[phi.isfinite()]
    bound = float(finite.flatten().sort().values[int(0.9 * (finite.numel() - 1))]) if finite.numel() else 1.0
    monkeypatch.setattr(F, "SCAN_CPP_THREADS", threads)
    for b in (bound, None, math.inf):
        want = F._sweep_blocks(z, mean, inv_var, b, False)
        got = F._sweep_cpp(z, mean, inv_var, b)
        for name, w, g in zip(("s1", "s2"), want[:2], got[:2]):  # summation order differs
            assert g.dtype == torch.float64
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, equal_nan=True, msg=name)
        if b is None:
            assert got[2] is None and want[2] is None
            continue
        for name, w, g in zip(("idx", "d", "phi"), want[2:5], got[2:5]):
            assert g.dtype == w.dtype and torch.equal(g, w), name
        if b == bound and shape[0] * shape[1] > 8:
            assert 0 < got[2].numel() < z.numel()
        assert torch.equal(got[2], torch.nonzero(phi.reshape(-1) >= b).squeeze(1))


def test_scan_selects_the_same_with_and_without_cpp(monkeypatch):
    _require_cpp()
    z, mean, inv_var = _data(300, 1001, seed=4)
    runs = []
    for use in (True, False):
        monkeypatch.setattr(F, "USE_CPP_SCAN", use)
        runs.append(
            (F.scan(z, mean, inv_var, tau=3.0, level_bound=2.0), F.scan(z, mean, inv_var, top_k=500, level_bound=2.0))
        )
    for a, b in zip(*runs):
        for name in ("sel", "sel_d", "sel_phi", "cand_phi"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert a.bound == b.bound
        for x, y in zip(a.moments, b.moments):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(a.phi_sum, b.phi_sum, rtol=1e-6, atol=0)
    assert runs[0][0].sel.numel() > 0 and runs[0][1].sel.numel() == 500


@pytest.mark.parametrize("use_cpp", [True, False])
def test_scan_moments_stay_exact_when_the_running_mean_is_far(use_cpp, monkeypatch):
    """A column whose batch mean is 1e4 standard deviations from the running mean (0, as before the first commit):
    the shifted formula alone would lose M2 (checked below), so scan redoes that batch in two passes."""
    if use_cpp:
        _require_cpp()
    monkeypatch.setattr(F, "USE_CPP_SCAN", use_cpp)
    g = torch.Generator().manual_seed(0)
    T, N = 512, 16
    z = 0.3 + 0.2 * torch.randn(T, N, generator=g)
    z[:, 3] = 500.0 + 0.05 * torch.randn(T, generator=g)  # mean / std = 1e4
    mean, inv_var = torch.zeros(N), torch.ones(N)
    z64 = z.double()
    m2_exact = ((z64 - z64.mean(0)) ** 2).sum(0)
    sc = F.scan(z, mean, inv_var, tau=1e9)
    torch.testing.assert_close(sc.moments[2].double(), m2_exact, rtol=1e-5, atol=0)
    torch.testing.assert_close(sc.moments[1].double(), z64.mean(0), rtol=1e-6, atol=1e-7)
    # the shifted formula on its own is far off on that column (what the two-pass fallback protects against)
    d = z - mean
    s1, s2 = d.double().sum(0), (d * d).double().sum(0)
    shifted = s2 - s1 * s1 / T
    assert abs(float(shifted[3] / m2_exact[3]) - 1.0) > 1e-3
    # near the batch mean, the shifted sweep itself is used and is as close
    sc = F.scan(z, z.mean(0), inv_var, tau=1e9)
    torch.testing.assert_close(sc.moments[2].double(), m2_exact, rtol=1e-5, atol=0)


def test_cpp_sweep_is_the_same_for_any_thread_count_and_edge_inputs():
    """Chunks are merged in order: the same bits with 1, 3 or 7 threads. No rows, a bound beyond fp32's range and
    non-fp32 statistics (which the C++ sweep does not take) give what the torch sweep gives."""
    _require_cpp()
    import numpy as np

    z, mean, inv_var = _data(700, 37, seed=9)
    args = (z.numpy(), mean.numpy(), inv_var.numpy(), 3.0, True)
    runs = [F._cpp_scan.scan(*args, threads) for threads in (1, 3, 7)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert np.array_equal(a, b)
    assert runs[0][2].size > 0
    empty = torch.zeros(0, 37)
    for sweep in (F._sweep_cpp, F._sweep_blocks):
        out = sweep(empty, mean, inv_var, 3.0, False)
        assert out[2].numel() == 0 and out[2].dtype == torch.int64 and out[4].numel() == 0
        out = sweep(z, mean, inv_var, 1e300, False)  # beyond fp32: nothing selected, no overflow warning
        assert out[2].numel() == 0
    assert not F._cpp_scan_usable(z, mean.double(), inv_var)
    assert not F._cpp_scan_usable(z.bfloat16(), mean, inv_var)
    sc = F.scan(z.bfloat16(), mean, inv_var, tau=3.0, keep_phi=True)  # phi in fp32 whatever z's dtype
    assert sc.phi.dtype == torch.float32 and sc.sel.numel() > 0
