"""The global tau_k reading streamed in linear time (fkr.GlobalKills): exact against top-k on all values."""

import pytest
import torch

from neox_l2e.l2e import fkr as fkrlib


def _chunks(phi, labels, sizes):
    out, s = [], 0
    for n in sizes:
        out.append((phi[s : s + n], labels[s : s + n]))
        s += n
    assert s == phi.shape[0]
    return out


@pytest.mark.parametrize("kind", ["continuous", "ties", "zeros"])
def test_global_kills_equal_exact_topk(kind):
    g = torch.Generator().manual_seed({"continuous": 0, "ties": 1, "zeros": 2}[kind])
    T, N, C = 700, 96, 4
    z = torch.randn(T, N, generator=g) * torch.rand(N, generator=g) * 3
    if kind == "ties":
        z = z.round()  # few distinct values: many ties at tau_k
    if kind == "zeros":
        z[:, :80] = 1.0  # constant neurons: phi == 0 for most pairs
    phi = fkrlib.dataset_phi(z)
    labels = torch.randint(0, C, (T,), generator=g)
    labels[::13] = -1  # unlabelled tokens count in tau_k but kill nothing
    lstar = fkrlib.preferred_labels(fkrlib.label_phi_means(phi, labels, C)[0])
    ks = [0.1, 0.5, 2.0, 5.0, 37.0, 100.0]
    gk = fkrlib.GlobalKills(ks, T * N)
    parts = _chunks(phi, labels, [1, 250, 199, 250])
    for p, _ in parts:
        gk.add_values(p)
    gk.finish_values()
    for p, lab in parts:
        gk.add_kills(p, lab, lstar)
    got = gk.result()
    flat = phi.reshape(-1)
    for k in ks:
        K = fkrlib.kills_for(k, T * N)
        tau_ref = flat.topk(K).values[-1]  # the exact K-th largest value
        assert got[k][0] == tau_ref.item()
        assert tau_ref.item() == fkrlib.kill_threshold(phi, k, "global").item()
        assert got[k][1:] == fkrlib.kill_counts(phi, labels, lstar, tau_ref), k


def test_global_kills_checks_the_value_count():
    gk = fkrlib.GlobalKills([1.0], 100)
    gk.add_values(torch.rand(5, 10))
    with pytest.raises(ValueError, match="saw 50 values, expected 100"):
        gk.finish_values()
