"""Held-out monosemanticity (neox_l2e.l2e.heldout): the numbers equal an independent float64 two-pass
computation; the token set is fixed (document order, not the seed's); bad settings fail in one line; a
training run logs ms_heldout/... (baseline included) beside l2e_train/...."""

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from neox_l2e.l2e import heldout as H

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from train_common import VOCAB, datasets, tiny_cfg  # noqa: E402

LEVELS = [5.0, 10.0, 25.0]


def _fixed_activations(T=301, N=7, seed=0) -> np.ndarray:
    """Columns of different kinds: Gaussian, heavy-tailed, sparse spikes, a large offset with small noise,
    a GELU-like half-rectified one, a constant (degenerate) one."""
    g = np.random.default_rng(seed)
    z = np.empty((T, N))
    z[:, 0] = g.normal(0.3, 1.0, T)
    z[:, 1] = g.standard_t(3, T)
    z[:, 2] = np.where(g.random(T) < 0.02, 8.0, 0.0) + g.normal(0, 0.05, T)
    z[:, 3] = 1e3 + g.normal(0, 1e-2, T)
    z[:, 4] = np.maximum(g.normal(-0.5, 1.0, T), 0.0) - 0.1
    z[:, 5] = 2.5
    z[:, 6] = g.exponential(1.0, T) ** 2
    return z


def _reference(z: np.ndarray, levels, running_var=None) -> dict:
    """Eq. 1 on the whole set, two passes in float64, written independently of the module."""
    T, N = z.shape
    mean = z.mean(0)
    var = ((z - mean) ** 2).sum(0) / (T - 1)
    ok = var > 1e-12
    phi = np.where(ok, (z - mean) ** 2 / np.where(ok, var, 1.0), 0.0)
    out = {f"frac_phi_gt_{lv:g}": float((phi > lv).mean()) for lv in levels}
    max_phi = phi.max(0)
    m2 = ((z - mean) ** 2).mean(0)
    m4 = ((z - mean) ** 4).mean(0)
    kurt = np.where(ok, m4 / np.where(ok, m2, 1.0) ** 2, np.nan)
    out.update(
        max_phi_median=np.median(max_phi),
        max_phi_p90=np.quantile(max_phi, 0.9),
        kurtosis_median=np.nanmedian(kurt),
        kurtosis_p90=np.nanquantile(kurt, 0.9),
    )
    if running_var is not None:
        out["var_ratio_median"] = np.median(var / running_var)
    edges = np.asarray(H.PHI_EDGES)
    hist = np.bincount(np.searchsorted(edges, phi.reshape(-1), side="right"), minlength=len(edges) + 1)
    return {"metrics": out, "hist": hist.tolist()}


def test_phi_stats_equal_an_independent_two_pass_computation():
    z = _fixed_activations()
    running = np.linspace(0.5, 4.0, z.shape[1])
    ref = _reference(z, LEVELS, running)
    # uneven chunks, fp32 input as the model gives it: the reference sees the same fp32-rounded values
    z32 = torch.tensor(z, dtype=torch.float32)
    chunks = [z32[:50], z32[50:51], z32[51:200], z32[200:]]
    got = H.phi_stats(chunks, LEVELS, running_var=torch.tensor(running))
    ref = _reference(z32.double().numpy(), LEVELS, running)
    assert set(got["metrics"]) == set(ref["metrics"])
    for k, v in ref["metrics"].items():
        assert got["metrics"][k] == pytest.approx(float(v), rel=1e-9, abs=1e-12), k
    assert got["hist"] == ref["hist"] and sum(got["hist"]) == z.size
    assert got["tokens"] == z.shape[0]
    # the set is non-trivial: something above every level, and the spiky neuron far above the Gaussian one
    assert all(got["metrics"][f"frac_phi_gt_{lv:g}"] > 0 for lv in LEVELS)
    # scale-free: shrinking every activation (as L2E does to the inhibited layers) changes nothing
    shrunk = H.phi_stats([c * 0.25 for c in chunks], LEVELS)
    for k in ("frac_phi_gt_5", "frac_phi_gt_25", "kurtosis_median", "max_phi_p90"):
        assert shrunk["metrics"][k] == pytest.approx(got["metrics"][k], rel=1e-6), k


def test_measure_on_a_model_equals_the_reference_on_its_captured_activations():
    from neox_l2e.model import GPTNeoX

    cfg = tiny_cfg()
    model = GPTNeoX(cfg, vocab_size=VOCAB).eval()
    tokens = torch.randint(0, VOCAB, (5 * 16 + 7,), generator=torch.Generator().manual_seed(3))  # a partial row
    layers = {i: model.gpt_neox.layers[i].mlp for i in range(cfg.model.num_layers)}
    got = H.measure(model, layers, tokens, seq_length=16, batch_size=2, levels=LEVELS)
    seen = {i: [] for i in layers}
    with H.capture_mlp(layers, lambda i, z: seen[i].append(z.reshape(-1, z.shape[-1]).double())):
        with torch.no_grad():
            for row in (tokens[:80].reshape(5, 16), tokens[80:].reshape(1, 7)):
                model(row)
    assert all(not m.up_op._forward_hooks for m in layers.values())  # the hooks were removed
    for i in layers:
        z = torch.cat(seen[i]).numpy()
        assert z.shape[0] == tokens.numel()
        ref = _reference(z, LEVELS)
        for k, v in ref["metrics"].items():
            assert got[i]["metrics"][k] == pytest.approx(float(v), rel=1e-6, abs=1e-12), (i, k)


def test_token_set_is_document_order_and_independent_of_the_seed(tmp_path):
    from neox_l2e.config import load_config
    from neox_l2e.data import build_datasets, write_indexed_dataset

    docs = [list(range(1 + 40 * d, 1 + 40 * d + 17 + d)) for d in range(30)]
    prefix = write_indexed_dataset(str(tmp_path / "v"), docs, vocab_size=2000)
    data = load_config(
        [],
        {
            "num_layers": 2,
            "hidden_size": 32,
            "num_attention_heads": 4,
            "train_data_paths": [prefix],
            "valid_data_paths": [prefix],
        },
    ).data
    flat = np.concatenate(docs)
    sets = []
    for seed in (1, 2):
        ds = build_datasets(data, 16, seed, {"train": 8, "valid": 8, "test": 0})["valid"]
        sets.append(H.heldout_tokens(ds, 300))
    assert torch.equal(sets[0], sets[1]) and sets[0].tolist() == flat[:300].tolist()
    # default: up to DEFAULT_TOKENS, all of a smaller split
    assert H.heldout_tokens(ds, None).tolist() == flat.tolist()
    # an explicit size the split cannot give: one line naming the key
    with pytest.raises(
        H.HeldoutError,
        match=r"^ms-heldout-tokens: 5000 held-out tokens requested but the valid "
        r"split holds only \d+",
    ):
        H.heldout_tokens(ds, 5000)


def test_layer_settings_that_name_no_layer_are_one_clear_error():
    assert H.resolve_layers("all", 4, [1, 2]) == [0, 1, 2, 3]
    assert H.resolve_layers("inhibited", 4, [2, 1]) == [1, 2]
    assert H.resolve_layers([3, 0, 3], 4, []) == [0, 3]
    for spec, msg in (
        ([], "names no layer"),
        ([7], "layer 7 is out of range"),
        ("middle", "unknown value"),
        ("inhibited", "names no layer"),
    ):
        with pytest.raises(H.HeldoutError, match=f"^ms-heldout-layers: .*{msg}"):
            H.resolve_layers(spec, 4, [])


def test_trainer_refuses_bad_settings_in_one_line():
    from neox_l2e.config import ConfigError
    from neox_l2e.training.loop import Trainer

    with pytest.raises(ConfigError, match=r"ms-heldout-layers: the list names no layer") as e:
        Trainer(tiny_cfg(ms_heldout_layers=[]), datasets=datasets(), vocab_size=VOCAB, quiet=True)
    assert "\n" not in str(e.value)
    with pytest.raises(
        ConfigError,
        match=r"ms-heldout-tokens: 100000 held-out tokens requested but the valid "
        r"split holds only 512",
    ) as e:
        Trainer(tiny_cfg(ms_heldout_tokens=100000), datasets=datasets(), vocab_size=VOCAB, quiet=True)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("l2e", [True, False], ids=["l2e", "baseline"])
def test_training_logs_heldout_metrics_beside_the_running_stat_ones(tmp_path, l2e):
    from neox_l2e.training.loop import train

    cfg = tiny_cfg(
        train_iters=4,
        eval_interval=2,
        log_interval=2,
        log_dir=str(tmp_path),
        l2e_enabled=l2e,
        l2e_layers=[1],
        l2e_min_samples=8,
        ms_heldout_tokens=200,
    )
    out = io.StringIO()
    res = train(cfg, datasets=datasets(), vocab_size=VOCAB, stream=out)
    assert "held-out monosemanticity (ms_heldout/...): 200 valid tokens, layers [0, 1]" in out.getvalue()
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in recs if r["kind"] == "valid"]
    assert [r["iteration"] for r in valid] == [2, 4]  # every evaluation and the end
    for r in valid:
        assert r["ms_heldout/tokens"] == 200
        for layer in (0, 1):  # every layer by default
            for k in (
                "frac_phi_gt_5",
                "frac_phi_gt_25",
                "max_phi_median",
                "max_phi_p90",
                "kurtosis_median",
                "kurtosis_p90",
            ):
                assert np.isfinite(r[f"ms_heldout/layer{layer}/{k}"]), (layer, k)
        # the running-variance ratio exists where there is a running variance: the inhibited layer of L2E
        assert ("ms_heldout/layer1/var_ratio_median" in r) == l2e
        assert "ms_heldout/layer0/var_ratio_median" not in r
    train_recs = [r for r in recs if r["kind"] == "train"]
    assert not any(k.startswith("l2e/") for r in recs for k in r)  # the old, ambiguous names are gone
    assert any(k.startswith("l2e_train/layer1/") for r in train_recs for k in r) == l2e
    hist = [r for r in recs if r["kind"] == "ms_heldout_hist"]
    assert len(hist) == 2 and sum(hist[-1]["layer0"]) == 200 * cfg.ffn_size
    assert set(res.heldout_metrics) == {0, 1} and len(res.heldout_history) == 2


def _tp_worker(rank, world):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parallel"))
    from tp_common import random_full_state, tp_model
    from tp_common import tiny_cfg as tp_cfg

    from neox_l2e.parallel import ParallelState

    ps = ParallelState.from_distributed(tp=2)
    cfg = tp_cfg()
    model = tp_model(cfg, ps, random_full_state(cfg)).eval()
    tokens = torch.randint(0, 100, (3 * 16 + 5,), generator=torch.Generator().manual_seed(11))
    mlps = {i: model.gpt_neox.layers[i].mlp for i in range(cfg.model.num_layers)}
    running = {1: torch.linspace(0.5, 2.0, cfg.ffn_size)[ps.tp_rank * 64 : (ps.tp_rank + 1) * 64]}
    return H.measure(model, mlps, tokens, 16, 2, LEVELS, ps=ps, running_vars=running)


def test_tensor_parallel_ranks_report_the_layer_wide_values():
    """2 TP ranks (each with half of the neurons) report what one rank holding all of them reports."""
    from distributed import run_ranks

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parallel"))
    from tp_common import random_full_state
    from tp_common import tiny_cfg as tp_cfg

    from neox_l2e.model import GPTNeoX
    from neox_l2e.parallel import ParallelState

    cfg = tp_cfg()
    assert cfg.ffn_size == 128
    model = GPTNeoX(cfg, ParallelState.single())
    model.load_state_dict(random_full_state(cfg))
    tokens = torch.randint(0, 100, (3 * 16 + 5,), generator=torch.Generator().manual_seed(11))
    mlps = {i: model.eval().gpt_neox.layers[i].mlp for i in range(cfg.model.num_layers)}
    ref = H.measure(model, mlps, tokens, 16, 2, LEVELS, running_vars={1: torch.linspace(0.5, 2.0, 128)})
    got = run_ranks(_tp_worker, world=2)
    pairs = tokens.numel() * cfg.ffn_size
    for r in got:  # both ranks: the layer-wide numbers
        for i in (0, 1):
            assert set(r[i]["metrics"]) == set(ref[i]["metrics"])
            assert ("var_ratio_median" in r[i]["metrics"]) == (i == 1)
            for k, v in ref[i]["metrics"].items():
                tol = 1.5 / pairs if k.startswith("frac_") else 1e-4 * abs(v)
                assert abs(r[i]["metrics"][k] - v) <= tol, (i, k, r[i]["metrics"][k], v)
            assert sum(r[i]["hist"]) == pairs
