"""The streaming scan: a planted monosemantic neuron is found; streaming == the in-memory FKR library."""

import math

import pytest
import torch
from analysis_helpers import tiny_cfg

from neox_l2e.analysis.labelled import LabelledTokens
from neox_l2e.analysis.scan import ScanOptions, forward_mlp_activations, scan_model
from neox_l2e.l2e import fkr as fkrlib
from neox_l2e.model import GPTNeoX

VOCAB, SEQ, PLANT_LAYER, PLANT_NEURON = 96, 16, 0, 37


def planted_model():
    """Tiny model where layer-0 neuron 37 fires only on tokens 0..23 (label 'a'): their embeddings carry a large
    component on hidden dim 0, which no other token has, and the neuron's up-projection row reads only dim 0."""
    torch.manual_seed(0)
    cfg = tiny_cfg(num_layers=2, hidden=32, vocab=VOCAB, seq=SEQ)
    model = GPTNeoX(cfg).eval()
    with torch.no_grad():
        emb = model.gpt_neox.embed_in.weight  # [V, h]
        emb[:, 0] = 0.0
        emb[:24, 0] = 1.0  # label 'a' tokens: ids 0..23
        up = model.gpt_neox.layers[PLANT_LAYER].mlp.dense_h_to_4h
        up.weight[PLANT_NEURON].zero_()
        up.weight[PLANT_NEURON, 0] = 4.0
        up.bias[PLANT_NEURON] = -2.0
    return model


def planted_data(n_seq=48, seed=0):
    """labels tied to disjoint token-id ranges: a = 0..23 (1 window in 4), b = 24..59, c = 60..95."""
    g = torch.Generator().manual_seed(seed)
    seqs, labs = [], []
    ranges = {"a": (0, 24), "b": (24, 60), "c": (60, 96)}
    for i in range(n_seq):
        lab = "a" if i % 4 == 0 else ("b" if i % 4 in (1, 2) else "c")
        lo, hi = ranges[lab]
        n = SEQ if i % 5 else SEQ - 5  # some padded windows
        seqs.append(torch.randint(lo, hi, (n,), generator=g).tolist())
        labs.append(lab)
    return LabelledTokens.from_sequences(seqs, labs, SEQ)


@pytest.fixture(scope="module")
def planted():
    model, data = planted_model(), planted_data()
    opts = ScanOptions(batch_size=5, neuron_sample=200, ks_tokens=10_000, fkr_ks=(1.0, 2.0, 5.0, 10.0), progress=False)
    return model, data, scan_model(model, data, opts, name="planted")


def test_planted_neuron_is_found(planted):
    _, data, res = planted
    a = data.label_names.index("a")
    layer = res.layers[PLANT_LAYER]
    j = PLANT_NEURON
    assert int(layer.l_star[j]) == a
    phi_a, phi_not_a = float(layer.phi_l[a, j]), float(layer.phi_not_l[a, j])
    # label a holds ~1/4 of the tokens: a binary neuron gives phi_a ~ 3, phi_-a ~ 1/3
    assert phi_a > 2.0 and phi_not_a < 0.5 and phi_a / phi_not_a > 8, (phi_a, phi_not_a)
    # it is the layer's most label-selective neuron, well above the typical (random) neuron
    ratio = layer.phi_lstar / layer.phi_not_lstar.clamp_min(1e-9)
    assert int(ratio.argmax()) == j
    assert float(ratio[j]) > 5 * float(ratio.median())
    # K-S: the planted neuron is in the sample (200 of 128 neurons: all) and has a large statistic
    m = (layer.sample == j).nonzero().item()
    assert float(layer.ks_stat[m]) > 0.5 and float(layer.ks_stat[m]) > 3 * float(layer.ks_stat.median())


def test_scan_can_fail_without_the_plant():
    """Control: the same tiny model without the planted weights has no such neuron at 37."""
    torch.manual_seed(0)
    model = GPTNeoX(tiny_cfg(num_layers=2, hidden=32, vocab=VOCAB, seq=SEQ)).eval()
    res = scan_model(
        model,
        planted_data(),
        ScanOptions(batch_size=8, neuron_sample=8, compute_ks=False, fkr_modes=(), progress=False),
    )
    layer = res.layers[PLANT_LAYER]
    a = res.label_names.index("a")
    assert float(layer.phi_l[a, PLANT_NEURON]) / float(layer.phi_not_l[a, PLANT_NEURON]) < 8


def _all_activations(model, data, layer):
    zs, labs = [], []
    forward_mlp_activations(model, data, [layer], 7, lambda i, z, lab, idx: (zs.append(z.clone()), labs.append(lab)))
    return torch.cat(zs), torch.cat(labs)


@pytest.mark.parametrize("layer", [0, 1])
def test_streaming_matches_in_memory_library(planted, layer):
    """Batched (streamed) statistics == neox_l2e.l2e.fkr on all activations at once."""
    model, data, res = planted
    z, labels = _all_activations(model, data, layer)
    assert z.shape == (data.num_tokens, model.gpt_neox.layers[0].mlp.dense_h_to_4h.weight.shape[0])
    phi = fkrlib.dataset_phi(z)
    phi_l, phi_not_l = fkrlib.label_phi_means(phi, labels, len(data.label_names))
    lstar = fkrlib.preferred_labels(phi_l)
    got = res.layers[layer]
    torch.testing.assert_close(got.phi_l, phi_l.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.phi_not_l, phi_not_l.float(), rtol=1e-4, atol=1e-5)
    assert torch.equal(got.l_star, lstar)
    for mode in ("per-token", "global"):
        ref = fkrlib.fkr(phi, labels, lstar, [1.0, 2.0, 5.0, 10.0], mode=mode)
        for k, r in ref.items():
            assert got.kills[mode][k] == r.kills, (mode, k)
            assert got.fkr[mode][k] == pytest.approx(r.fkr, abs=1e-12), (mode, k)
            if mode == "global":
                assert got.tau[k] == pytest.approx(fkrlib.kill_threshold(phi, k, "global").item(), rel=1e-6)
    # K-S (scipy) == the library's K-S statistic on the same token subsample: here every token is kept
    for m in range(0, got.sample.numel(), 17):
        j = int(got.sample[m])
        assert float(got.ks_stat[m]) == pytest.approx(fkrlib.neuron_ks(phi, labels, j, int(lstar[j])), abs=1e-6)
    # the layer-wise summary over the seeded sample
    assert got.summary(data.label_names)["mean_phi_lstar_sample"] == pytest.approx(
        fkrlib.mean_phi_lstar(phi_l, lstar, got.sample.tolist()), rel=1e-4
    )


def test_padding_is_ignored(planted):
    """Windows padded with garbage give the same statistics as the same windows padded with zeros."""
    model, data, res = planted
    other = LabelledTokens(data.tokens.clone(), data.valid, data.labels, data.label_names)
    other.tokens[~data.valid] = VOCAB - 1
    res2 = scan_model(
        model,
        other,
        ScanOptions(batch_size=5, neuron_sample=200, compute_ks=False, fkr_ks=(1.0, 2.0, 5.0, 10.0), progress=False),
    )
    for a, b in zip(res.layers, res2.layers):
        torch.testing.assert_close(a.phi_l, b.phi_l)
        assert a.fkr == b.fkr


def test_batch_size_does_not_change_results(planted):
    model, data, res = planted
    res2 = scan_model(
        model,
        data,
        ScanOptions(batch_size=48, neuron_sample=200, ks_tokens=10_000, fkr_ks=(1.0, 2.0, 5.0, 10.0), progress=False),
    )
    for a, b in zip(res.layers, res2.layers):
        torch.testing.assert_close(a.phi_l, b.phi_l, rtol=1e-5, atol=1e-6)
        assert torch.equal(a.l_star, b.l_star) and a.kills == b.kills
        assert not any(math.isnan(v) for d in a.fkr.values() for v in d.values())


def test_plots_colour_by_run_and_mark_inhibited_layers(planted, tmp_path):
    """Runs of one size get distinct colours; L2E's layers carry a mark; FKR panels share the y-axis and draw
    the chance FKR; the run's inhibited layers come from its config."""
    import dataclasses

    from analysis_helpers import png_has_content, tiny_cfg

    from neox_l2e.analysis.cli import inhibited_layers
    from neox_l2e.analysis.plots import layerwise_figure, plot_fkr

    _, data, res = planted
    runs = [dataclasses.replace(res, name=n, inhibited_layers=inh) for n, inh in (("base", []), ("l2e", [1]))]
    fig = layerwise_figure(runs)
    ax = fig.axes[0]
    named = [l for l in ax.get_lines() if l.get_label().startswith(("base", "l2e"))]  # one line per run
    assert len(named) == 2 and named[0].get_color() != named[1].get_color()
    assert named[1].get_label().endswith("L2E on layers 1")
    marks = [l for l in ax.get_lines() if l.get_marker() == "s" and not l.get_label().startswith(("base", "l2e"))]
    assert len(marks) == 1 and list(marks[0].get_xdata()) == [1.0]  # layer 1 of 2: relative depth 1
    assert "layer inhibited by L2E" in [t.get_text() for t in ax.get_legend().get_texts()]
    shares = [n / sum(res.tokens_per_label.values()) for n in res.tokens_per_label.values()]
    assert 1 - max(shares) <= runs[0].chance_fkr(res.layers[0]) <= 1 - min(shares)
    png_has_content(plot_fkr(runs, tmp_path / "fkr.png"))
    on = tiny_cfg(num_layers=4, l2e_enabled=True, l2e_layers="mid2")
    assert inhibited_layers(on) == [1, 2] and inhibited_layers(tiny_cfg(num_layers=4)) == []
