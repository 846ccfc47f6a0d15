"""The command-line tools end to end on tiny models (CPU, offline)."""

import json
from collections import Counter

from analysis_helpers import png_has_content, run_tool


def test_labelled_dataset_builder(labelled_jsonl):
    recs = [json.loads(l) for l in open(labelled_jsonl)]
    counts = Counter(r["label"] for r in recs)
    assert set(counts) == {"python", "c", "english"} and all(c == 12 for c in counts.values())
    assert all(isinstance(r["text"], str) and len(r["text"]) >= 100 for r in recs)
    py = [r["text"] for r in recs if r["label"] == "python"]
    assert any(("def " in t or "import " in t or "class " in t) for t in py)


def test_labelled_dataset_is_deterministic(tmp_path, labelled_jsonl):
    out = tmp_path / "again.jsonl"
    r = run_tool(
        "build_labelled_dataset.py", out, "--docs-per-label", 12, "--chars-per-doc", 400, "--labels", "python,c,english"
    )
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == labelled_jsonl.read_bytes()


def test_ms_scan_two_models(tmp_path, labelled_jsonl, tiny_hf_dir, tiny_neox_ckpt):
    ckpt, _ = tiny_neox_ckpt
    out = tmp_path / "scan"
    r = run_tool(
        "ms_scan.py",
        f"small={tiny_hf_dir}",
        f"bigger={ckpt}",
        "--data",
        labelled_jsonl,
        "--out",
        out,
        "--seq-len",
        48,
        "--max-tokens-per-label",
        400,
        "--neuron-sample",
        40,
        "--ks-tokens",
        300,
        "--fkr-k",
        "1,5",
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    models = {m["name"]: m for m in rep["models"]}
    assert set(models) == {"small", "bigger"}
    assert len(models["small"]["layers"]) == 2 and len(models["bigger"]["layers"]) == 4
    assert models["bigger"]["num_parameters"] > models["small"]["num_parameters"]
    for m in models.values():
        assert set(m["labels"]) == {"python", "c", "english"}
        for layer in m["layers"]:
            # phi_l* >= phi over the same neurons' other tokens on average, by the definition of l*
            assert layer["mean_phi_lstar_sample"] > layer["mean_phi_not_lstar_sample"] > 0
            assert 0 <= layer["mean_ks_stat_sample"] <= 1
            for mode in ("per-token", "global"):
                assert set(layer["fkr"][mode]) == {"1.0", "5.0"}
                assert all(0 <= v <= 1 for v in layer["fkr"][mode].values())
    neurons = (out / "neurons.csv").read_text().splitlines()
    assert len(neurons) == 1 + 2 * 128 + 4 * 256
    for name in ("layerwise_phi", "ks", "histograms", "fkr"):
        png_has_content(out / f"{name}.png")
    assert "| small | 0 |" in r.stdout and "| bigger | 3 |" in r.stdout


def test_fkr_tool(tmp_path, labelled_jsonl, tiny_neox_ckpt):
    ckpt, _ = tiny_neox_ckpt
    out = tmp_path / "fkr"
    r = run_tool(
        "fkr.py",
        ckpt,
        "--data",
        labelled_jsonl,
        "--out",
        out,
        "--seq-len",
        64,
        "--max-tokens-per-label",
        300,
        "--k",
        "1,2,3",
        "--layers",
        "1,2",
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((out / "fkr.json").read_text())
    assert [l["layer"] for l in rep["layers"]] == [1, 2]
    n_tokens = sum(rep["tokens_per_label"].values())
    for layer in rep["layers"]:
        n = layer["num_neurons"]
        for k in ("1.0", "2.0", "3.0"):
            # per-token: round(k% of N) kills per token; global: round(k% of N x T); a tie at tau_k adds a kill
            # (phi >= tau_k), and ties are rare with random weights
            want_tok = n_tokens * max(1, round(float(k) / 100 * n))
            want_glob = max(1, round(float(k) / 100 * n * n_tokens))
            assert want_tok <= layer["kills"]["per-token"][k] <= want_tok * 1.01
            assert want_glob <= layer["kills"]["global"][k] <= want_glob * 1.01
            for mode in ("per-token", "global"):
                assert 0.0 <= layer["fkr"][mode][k] <= 1.0
    assert "FKR (per-token tau_k)" in r.stdout and "FKR (global tau_k)" in r.stdout
    png_has_content(out / "fkr.png")


def test_cli_errors_are_one_line(tmp_path, labelled_jsonl, tiny_hf_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "x"}\n{not json\n')
    cases = [
        ("fkr.py", [tmp_path / "nope", "--data", labelled_jsonl], "checkpoint not found"),
        ("fkr.py", [tiny_hf_dir, "--data", bad], "bad.jsonl:2"),
        ("ms_scan.py", [tmp_path, "--data", labelled_jsonl], "unknown checkpoint layout"),
        ("fkr.py", [tiny_hf_dir, "--data", tmp_path / "missing.jsonl"], "not found"),
        ("evaluate.py", [tiny_hf_dir, "--tasks", "nosuchtask"], "unknown task"),
        ("compare_runs.py", [tmp_path / "norun"], "run not found"),
    ]
    for tool, args, needle in cases:
        r = run_tool(tool, *args)
        assert r.returncode == 2, (tool, r.stderr[-2000:])
        lines = [l for l in r.stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (tool, r.stderr[-2000:])
