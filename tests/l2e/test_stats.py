"""Running statistics: Chan merges against float64 two-pass references, the exact global k-th largest."""

import pytest
import torch
from l2e_common import layer_inputs, make_inhibitor, run_stream

from neox_l2e.l2e import functional as F
from neox_l2e.l2e import stats as S


def _fold_all(batches, decay=None, n=None):
    n = n or batches[0].shape[1]
    run = (torch.zeros(n, dtype=torch.float64), torch.zeros(n), torch.zeros(n))
    for z in batches:
        c, m, m2 = S.fold(run, F.batch_moments(z), decay)
        run = (c, m.float(), m2.float())  # stored as the inhibitor stores them
    return run


def _assert_stats(run, z64, mean_atol, var_rtol):
    c, m, v = S.two_pass_moments64(z64)
    assert torch.equal(run[0], torch.full_like(run[0], float(c)))
    torch.testing.assert_close(run[1].double(), m, rtol=0, atol=mean_atol)
    var = run[2].double() / (c - 1)
    var_ref = v / (c - 1)
    torch.testing.assert_close(var, var_ref, rtol=var_rtol, atol=1e-30)


def test_merge_moments_matches_two_pass_on_uneven_batches():
    g = torch.Generator().manual_seed(1)
    sizes = [1, 7, 64, 3, 200, 2]
    batches = [torch.randn(s, 5, generator=g) * torch.tensor([1.0, 10.0, 0.1, 3.0, 100.0]) + 2 for s in sizes]
    run = _fold_all(batches)
    _assert_stats(run, torch.cat(batches).double(), mean_atol=1e-5, var_rtol=1e-5)
    # merge_ordered of the batch moments equals the same reference too
    c, m, m2 = F.merge_ordered([tuple(t.double() for t in F.batch_moments(z)) for z in batches])
    ref = S.two_pass_moments64(torch.cat(batches))
    torch.testing.assert_close(m, ref[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m2, ref[2], rtol=1e-5, atol=0)


def test_large_mean_small_noise_many_batches_fp32():
    """1e4 + noise of std 1e-2 in fp32, 400 batches: raw sums (sum z^2 - n mean^2) would lose every digit
    of the variance; the Chan merge keeps it to ~1e-3 relative."""
    g = torch.Generator().manual_seed(2)
    batches = [(1e4 + 1e-2 * torch.randn(128, 16, generator=g, dtype=torch.float64)).float() for _ in range(400)]
    z64 = torch.cat(batches).double()  # the exact fp32 values, in fp64
    run = _fold_all(batches)
    _assert_stats(run, z64, mean_atol=2e-3, var_rtol=2e-2)
    # the naive formula, for contrast, is far off (so the test above can tell the methods apart)
    zc = torch.cat(batches)
    naive = (zc.pow(2).sum(0) - zc.shape[0] * zc.mean(0).pow(2)) / (zc.shape[0] - 1)
    ref = S.two_pass_moments64(z64)
    assert ((naive.double() - ref[2] / (ref[0] - 1)).abs() / (ref[2] / (ref[0] - 1))).max() > 0.5


def test_near_constant_neurons_keep_tiny_variance():
    g = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(50):
        z = torch.full((97, 4), 3.14159)
        z[:, 1] += 1e-6 * torch.randn(97, generator=g)  # near-constant
        z[:, 2] = -1e-20  # a dead GELU neuron
        z[:, 3] = torch.randn(97, generator=g)
        batches.append(z)
    run = _fold_all(batches)
    c, m, m2 = S.two_pass_moments64(torch.cat(batches).double())
    assert run[2][0].item() <= 1e-9 * float(c)  # exactly-constant: ~0, not cancellation noise
    assert run[2][2].item() == 0.0
    torch.testing.assert_close(run[2][1].double() / (c - 1), m2[1] / (c - 1), rtol=2e-2, atol=0)
    torch.testing.assert_close(run[2][3].double() / (c - 1), m2[3] / (c - 1), rtol=1e-5, atol=0)


def test_decay_matches_weighted_reference():
    g = torch.Generator().manual_seed(4)
    batches = [torch.randn(32, 3, generator=g) + i * 0.1 for i in range(20)]
    d = 0.9
    run = _fold_all(batches, decay=d)
    # reference: every sample of batch i weighs d^(B-1-i); weighted mean / M2 in fp64
    w = torch.cat([torch.full((32,), d ** (len(batches) - 1 - i), dtype=torch.float64) for i in range(20)])
    z = torch.cat(batches).double()
    W = w.sum()
    mean = (w[:, None] * z).sum(0) / W
    m2 = (w[:, None] * (z - mean) ** 2).sum(0)
    torch.testing.assert_close(run[0], torch.full((3,), float(W), dtype=torch.float64))
    torch.testing.assert_close(run[1].double(), mean, rtol=0, atol=1e-5)
    torch.testing.assert_close(run[2].double(), m2, rtol=1e-5, atol=0)


def test_inhibitor_statistics_equal_two_pass_over_everything_it_saw():
    w, b = layer_inputs()
    inh = make_inhibitor()
    seen = []
    run_stream(inh, w, b, steps=30, t=50, collect=seen)
    z64 = torch.cat(seen).double()
    c, m, m2 = S.two_pass_moments64(z64)
    assert torch.equal(inh.count, torch.full((32,), float(c), dtype=torch.float64))
    torch.testing.assert_close(inh.mean.double(), m, rtol=0, atol=1e-6)
    torch.testing.assert_close(inh.m2.double(), m2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(inh.inv_var, F.inv_var_from_stats(inh.count, inh.m2, inh.min_samples))


@pytest.mark.parametrize("k", [1, 7, 100, 999, 1000])
def test_global_kth_largest_is_exact(k):
    g = torch.Generator().manual_seed(k)
    v = torch.rand(1000, generator=g) ** 4 * 50
    v[::10] = 0.0
    v[5] = v[6]  # a tie
    ref = torch.topk(v, k).values[-1]
    got = S.global_kth_largest(v, k)
    assert got.dtype == torch.float32 and got.item() == ref.item()
    assert F.quantile_tau(v, k / 1000) == ref.item()


class _FakeDP:
    """all_gather_dp of a DP group of len(parts) ranks, seen from rank ``dp_rank`` (no process group)."""

    def __init__(self, parts, dp_rank):
        self.parts, self.dp_rank, self.dp = parts, dp_rank, len(parts)

    def all_gather_dp(self, t):
        n = (t.numel() - 1) // 2
        out = [torch.cat([c.reshape(1), m, m2]).to(torch.float64) for c, m, m2 in self.parts]
        assert all(o.numel() == 2 * n + 1 for o in out)
        return out


def test_dp_merge_is_in_rank_order_whatever_the_rank():
    """Every DP rank must fold the gathered parts in the same (rank) order: bit-identical float64 results."""
    g = torch.Generator().manual_seed(5)
    parts = [F.batch_moments(torch.randn(n, 64, generator=g) * 3 + 1e3) for n in (17, 40, 5, 33)]
    res = [S.gather_merge_dp(_FakeDP(parts, r), *parts[r]) for r in range(len(parts))]
    for r in res[1:]:
        assert all(torch.equal(a, b) for a, b in zip(res[0], r))
    ref = F.merge_ordered([tuple(t.double() for t in p) for p in parts])
    assert all(torch.equal(a, b) for a, b in zip(res[0], ref))
