"""FKR and the MS validation quantities against brute-force references and a planted example."""

import math

import pytest
import torch

from neox_l2e.l2e import fkr as K


def _planted(T=4000, N=50, seed=0):
    """Labels 0..3 (label 2 rare, 5%); neuron 0 fires only on label-2 tokens, the others are noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.multinomial(torch.tensor([0.35, 0.3, 0.05, 0.3]), T, replacement=True, generator=g)
    z = torch.randn(T, N, generator=g) * 0.3
    z[:, 0] = 0.05 * torch.randn(T, generator=g) + 4.0 * (labels == 2).float()
    return z, labels


@pytest.mark.parametrize("mode", K.MODES)
def test_planted_neuron_has_lstar_2_and_near_zero_fkr(mode):
    z, labels = _planted()
    phi = K.dataset_phi(z)
    phi_l, phi_not_l = K.label_phi_means(phi, labels, 4)
    lstar = K.preferred_labels(phi_l)
    assert lstar[0].item() == 2
    assert phi_l[2, 0] > 10 * phi_not_l[2, 0]  # monosemantic: phi_l >> phi_-l
    tau = K.kill_threshold(phi, 2.0, mode)
    kills, false = K.neuron_kill_counts(phi, labels, lstar, tau)
    assert kills[0] > 0.5 * int((labels == 2).sum())  # it is killed on its feature
    assert false[0].item() / kills[0].item() < 0.02  # and almost only there
    rnd = kills[1:] > 20
    fkr_random = false[1:][rnd].sum().item() / kills[1:][rnd].sum().item()
    assert fkr_random > 0.5  # random neurons: mostly false kills
    res = K.fkr(phi, labels, lstar, [2.0], mode)[2.0]
    assert res.kills == int(kills.sum()) and res.false_kills == int(false.sum())


def test_all_monosemantic_layer_has_low_fkr_random_layer_high():
    g = torch.Generator().manual_seed(1)
    T, L = 3000, 4
    labels = torch.randint(0, L, (T,), generator=g)
    # 40 neurons, each tied to one label (10 per label), firing on half of that label's tokens (per-token kills
    # K per token whatever happens, so a token where none of its neurons fires gives a false kill)
    fire = torch.rand(T, 40, generator=g) < 0.5
    own = torch.arange(40) % L
    z_mono = 0.05 * torch.randn(T, 40, generator=g) + 3.0 * (fire & (labels[:, None] == own[None, :])).float()
    z_rand = torch.randn(T, 40, generator=g)
    for mode in K.MODES:
        res_m, lstar = K.fkr_from_activations(z_mono, labels, L, [2.5, 5.0], mode)
        assert torch.equal(lstar, own)
        res_r, _ = K.fkr_from_activations(z_rand, labels, L, [2.5, 5.0], mode)
        for k in (2.5, 5.0):
            assert res_m[k].fkr < 0.05, (mode, k, res_m[k])
            assert res_r[k].fkr > 0.6, (mode, k, res_r[k])


def test_thresholds_and_counts_match_brute_force():
    g = torch.Generator().manual_seed(2)
    T, N, L = 60, 25, 3
    z = torch.randn(T, N, generator=g, dtype=torch.float64).float()
    labels = torch.randint(-1, L, (T,), generator=g)  # some unlabelled tokens
    phi = K.dataset_phi(z)
    # phi: mean / unbiased var over all T tokens (labelled or not), in fp64
    zd = z.double()
    ref_phi = (zd - zd.mean(0)) ** 2 / zd.var(0, unbiased=True)
    torch.testing.assert_close(phi.double(), ref_phi, rtol=1e-6, atol=1e-7)
    phi_l, phi_not_l = K.label_phi_means(phi, labels, L)
    for l in range(L):
        for j in (0, 7, 24):
            own = phi[labels == l, j].double()
            rest = phi[(labels >= 0) & (labels != l), j].double()
            assert math.isclose(phi_l[l, j].item(), own.mean().item(), rel_tol=1e-9)
            assert math.isclose(phi_not_l[l, j].item(), rest.mean().item(), rel_tol=1e-9)
    lstar = K.preferred_labels(phi_l)
    keep = labels >= 0
    P, Lb = phi[keep], labels[keep]
    for k in (4.0, 10.0, 50.0):
        # per-token: the K-th largest of each token's N neurons
        Kt = max(1, round(k / 100 * N))
        kills = false = 0
        for i in range(P.shape[0]):
            t = sorted(P[i].tolist(), reverse=True)[Kt - 1]
            for j in range(N):
                if P[i, j] >= t:
                    kills += 1
                    false += int(Lb[i] != lstar[j])
        r = K.fkr(phi, labels, lstar, [k], "per-token")[k]
        assert (r.kills, r.false_kills) == (kills, false)
        # global: the K-th largest over all labelled (token, neuron) pairs
        Kg = max(1, round(k / 100 * N * P.shape[0]))
        t = sorted(P.flatten().tolist(), reverse=True)[Kg - 1]
        kill = P >= t
        r = K.fkr(phi, labels, lstar, [k], "global")[k]
        assert r.kills == int(kill.sum())
        assert r.false_kills == int((kill & (Lb[:, None] != lstar[None, :])).sum())


def test_chunked_sums_equal_whole():
    z, labels = _planted(T=1000, N=10)
    mean, var = K.moments(z)
    phi = K.dataset_phi(z, mean, var)
    parts = [K.label_phi_sums(phi[i : i + 300], labels[i : i + 300], 4) for i in range(0, 1000, 300)]
    s = sum(p[0] for p in parts), sum(p[1] for p in parts)
    a, b = K.label_phi_means(None, None, 4, sums=s)
    a2, b2 = K.label_phi_means(phi, labels, 4)
    torch.testing.assert_close(a, a2)
    torch.testing.assert_close(b, b2)


def test_ks_statistic_matches_scipy_and_neuron_ks():
    scipy_stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(3)
    a = torch.randn(300, generator=g)
    b = torch.randn(500, generator=g) + 0.3
    b[:50] = a[:50]  # ties across samples
    assert math.isclose(K.ks_statistic(a, b), scipy_stats.ks_2samp(a.numpy(), b.numpy()).statistic, rel_tol=1e-12)
    z, labels = _planted()
    phi = K.dataset_phi(z)
    assert K.neuron_ks(phi, labels, 0, 2) > 0.9  # own feature far above the rest
    assert K.neuron_ks(phi, labels, 5, 2) < 0.2


def test_mean_phi_lstar_and_sample_neurons():
    z, labels = _planted()
    phi = K.dataset_phi(z)
    phi_l, _ = K.label_phi_means(phi, labels, 4)
    idx = K.sample_neurons(50, 10, seed=4)
    assert idx.numel() == 10 and torch.equal(idx, K.sample_neurons(50, 10, seed=4))
    lstar = K.preferred_labels(phi_l)
    ref = sum(phi_l[lstar[j], j].item() for j in idx.tolist()) / 10
    assert math.isclose(K.mean_phi_lstar(phi_l, neurons=idx), ref, rel_tol=1e-9)
    assert K.mean_phi_lstar(phi_l, neurons=[0]) > 10
