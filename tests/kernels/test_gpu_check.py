"""tools/gpu_check.py on a machine without a CUDA device: one line that says so, exit status 0."""

import os
import subprocess
import sys

import pytest


def test_gpu_check_without_cuda_says_so_in_one_line(repo_root, tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(repo_root))
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", str(repo_root / "tools" / "gpu_check.py"), "--out", str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA device"), proc.stdout
    assert not (tmp_path / "out").exists()


def test_gpu_check_report_from_bench_rows(repo_root, tmp_path):
    """The merge step: rows as bench_kernels writes them give one CSV, one table and the goal lines."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", repo_root / "tools" / "gpu_check.py")
    gc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gc)
    bench = gc._bench_module()
    rows = []
    for variant, fwd, bwd in (
        ("floor", 1.0, 2.0),
        ("torch-l2e", 4.0, 6.0),
        ("fused:split", 1.04, 2.2),
        ("fused:fused-gemm", 1.3, 2.3),
    ):
        for pas, ms in (("fwd", fwd), ("bwd", bwd)):
            rows.append(
                dict(
                    shape="6.9b",
                    h=4096,
                    N=16384,
                    T=16384,
                    pass_=pas,
                    variant=variant,
                    ms=ms,
                    tflops=1.0,
                    gbs=1.0,
                    x_floor=ms / (1.0 if pas == "fwd" else 2.0),
                    vs_torch=(4.0 if pas == "fwd" else 6.0) / ms,
                    note="",
                )
            )
    path = tmp_path / "bench_6.9b.csv"
    bench.write_csv(path, rows, "H100", "bf16", "none")
    goals = gc.report(tmp_path, gc._read_rows([path, tmp_path / "missing.csv"]), bench)
    assert "goal 6.9b fused:split fwd: 1.040x floor (<= 1.05), 3.85x faster than torch-l2e (>= 1.5): MET" in goals
    assert any(g.startswith("goal 6.9b fused:fused-gemm fwd") and g.endswith("NOT MET") for g in goals)
    assert any(g.startswith("goal 6.9b fused:split fwd >= 3x") and g.endswith(": MET") for g in goals)
    assert (tmp_path / "gpu_check.csv").read_text().count("\n") == 1 + len(rows)
    assert "| 6.9b | fwd | fused:split | 1.040 |" in (tmp_path / "gpu_check.md").read_text()


def test_gpu_check_steps_time_out_and_keep_partial_results(repo_root, tmp_path, monkeypatch):
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("gpu_check", repo_root / "tools" / "gpu_check.py")
    gc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gc)
    monkeypatch.setitem(gc.STEP_TIMEOUT, "slow", 10)
    run = gc.Runner(tmp_path, budget_s=30)
    assert run.step("quick", [sys.executable, "-c", "print('hello')"], "quick.log")
    assert not run.step(
        "slow", [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"], "slow.log"
    )
    run.budget = 0  # spent: later steps are skipped, not started
    assert not run.step("late", [sys.executable, "-c", "print(1)"], "late.log")
    summary = json.loads((tmp_path / "summary.json").read_text())["steps"]
    assert summary["quick"]["status"] == "ok" and summary["slow"]["status"].startswith("timed out")
    assert summary["late"]["status"].startswith("skipped")
    assert (tmp_path / "quick.log").read_text().strip() == "hello"
    assert "started" in (tmp_path / "slow.log").read_text() and not (tmp_path / "late.log").exists()


def _gpu_check_module(repo_root):
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", repo_root / "tools" / "gpu_check.py")
    gc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gc)
    return gc


def _tiny_cfg():
    from neox_l2e.config import build_config

    return build_config(
        dict(
            num_layers=2,
            hidden_size=32,
            num_attention_heads=4,
            seq_length=16,
            max_position_embeddings=16,
            vocab_size=64,
            make_vocab_size_divisible_by=8,
            rotary_pct=0.25,
            gpt_j_residual=True,
            no_weight_tying=True,
        )
    )


def test_whole_step_measurement_runs_on_cpu(repo_root, tmp_path):
    """The whole-step measurement (part "step") through its own function, device-agnostic, at a tiny config on
    CPU: every variant gives a timed row (compile with the eager backend: dynamo only, fast), the FLOP count is the
    formula's, and the report writes its table and the goal lines."""
    import torch

    gc = _gpu_check_module(repo_root)
    cfg = _tiny_cfg()
    seen = []
    variants = ["ours", "ours+l2e", "ours+compile", "ours+l2e+compile", "hf"]
    rows = gc.whole_step(
        cfg, variants, 2, 1, 1, torch.device("cpu"), torch.float32, 1.0, "1b", "eager", on_row=seen.append
    )
    assert [r["variant"] for r in rows] == variants and seen == rows
    n_mm = sum(
        p.numel()
        for n, p in gc.build_variant(cfg, "ours", 64, torch.float32, torch.device("cpu"))[0].named_parameters()
        if "embed_in" not in n
    )
    for r in rows:
        assert r["micro_batch"] == 2 and r["tokens_per_step"] == 32 and r["median_s"] > 0, r
        assert r["matmul_params"] == n_mm
        assert r["tflops"] == pytest.approx(gc.step_flops(n_mm, 2, 32, 16, 32) / r["median_s"] / 1e12)
        assert r["mfu"] == pytest.approx(r["tflops"] / 1.0)
    assert "2 active" in rows[1]["note"]  # the inhibitors selected after the warm-up
    assert gc.step_flops(10, 2, 4, 8, 3) == 6 * 10 * 3 + 12 * 2 * 4 * 8 * 3
    goals = gc.step_report(tmp_path, rows)
    assert any(g.startswith("goal 1b MFU >= 45 %") for g in goals)
    assert any(g.startswith("goal 1b L2E overhead (eager) <= 1 %") for g in goals)
    assert any(g.startswith("goal 1b L2E overhead+compile <= 1 %") for g in goals)
    assert sum(g.startswith("info 1b ours") for g in goals) == 4
    assert (tmp_path / "gpu_check_step.csv").read_text().count("\n") == 1 + len(rows)
    assert "| 1b | ours+l2e+compile | 2 |" in (tmp_path / "gpu_check_step.md").read_text()
    assert gc.bf16_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and gc.bf16_peak_tflops("NVIDIA H200") == 989.0
    assert gc.bf16_peak_tflops("NVIDIA H100 PCIe") == 756.0 and gc.bf16_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gc.bf16_peak_tflops("NVIDIA H100 NVL") == 835.0
    assert gc.bf16_peak_tflops("cpu") is None


def test_whole_step_halves_the_micro_batch_on_out_of_memory(repo_root, monkeypatch):
    import torch

    gc = _gpu_check_module(repo_root)
    build = gc.build_variant

    def tight(*a, **k):  # a device that fits 2 sequences
        model, fn = build(*a, **k)

        def step(m, b, opt):
            if b.shape[0] > 2:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
            return fn(m, b, opt)

        return model, step

    monkeypatch.setattr(gc, "build_variant", tight)
    rows = gc.whole_step(_tiny_cfg(), ["ours", "hf"], 8, 1, 0, torch.device("cpu"), torch.float32, None)
    assert [r["micro_batch"] for r in rows] == [2, 2] and rows[0]["mfu"] is None
    assert "OOM at micro-batch 8; OOM at micro-batch 4" in rows[0]["note"] and "OOM" not in rows[1]["note"]


def test_whole_step_runs_earlier_variants_again_at_a_smaller_micro_batch(repo_root, monkeypatch):
    """A later variant that fits only a smaller micro-batch: the earlier ones run again at it (the comparisons
    need one micro-batch), and the goal lines read the rows at that micro-batch."""
    import torch

    gc = _gpu_check_module(repo_root)
    build = gc.build_variant

    def tight(cfg, variant, *a, **k):  # HF fits 1 sequence, ours 2
        model, fn = build(cfg, variant, *a, **k)

        def step(m, b, opt):
            if b.shape[0] > (1 if variant == "hf" else 2):
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
            return fn(m, b, opt)

        return model, step

    monkeypatch.setattr(gc, "build_variant", tight)
    rows = gc.whole_step(_tiny_cfg(), ["ours", "hf", "ours+l2e"], 2, 1, 0, torch.device("cpu"), torch.float32, 1.0)
    assert [(r["variant"], r["micro_batch"]) for r in rows] == [("ours", 2), ("hf", 1), ("ours", 1), ("ours+l2e", 1)]
    assert "OOM at micro-batch 2" in rows[1]["note"]
    assert rows[2]["note"].startswith("again at micro-batch 1 (hf did not fit 2)")
    goals = gc.step_goal_lines([dict(r, shape="1b") for r in rows])
    assert any(g.startswith("info 1b ours:") for g in goals)  # ours and HF now share micro-batch 1
    assert any(g.startswith("goal 1b L2E overhead (eager)") for g in goals)


def test_variants_share_the_weights_drawn_once(repo_root, monkeypatch):
    import torch

    from neox_l2e.model import GPTNeoX

    gc = _gpu_check_module(repo_root)
    draws = []
    init = GPTNeoX.init_weights
    monkeypatch.setattr(GPTNeoX, "init_weights", lambda self, *a, **k: (draws.append(1), init(self, *a, **k))[1])
    weights = {}
    cpu = torch.device("cpu")
    first, _ = gc.build_variant(_tiny_cfg(), "ours", 64, torch.float32, cpu, weights=weights)
    assert len(draws) == 1 and set(weights) == {n for n, _ in first.named_parameters()}
    for variant in ("ours+l2e", "hf"):
        model, _ = gc.build_variant(_tiny_cfg(), variant, 64, torch.float32, cpu, weights=weights)
        if variant == "hf":  # the HF copy of the same weights gives the same logits
            tokens = torch.arange(16).reshape(1, 16) % 64
            with torch.no_grad():
                diff = (model(input_ids=tokens).logits - first(tokens).logits[..., :64]).abs().max()
            assert diff <= 1e-5
        else:
            assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert len(draws) == 1  # drawn once, copied into the others


@pytest.mark.parametrize("missing", ["kernels", "package"])
def test_gpu_check_says_in_one_line_when_the_project_is_not_installed(
    repo_root, tmp_path, monkeypatch, capsys, missing
):
    """On a machine with a GPU but without the project installed, neox_l2e.kernels cannot be imported (and,
    run from outside the repository, neox_l2e neither: find_spec then raises): the command stops before its
    first step with one line naming the install command."""
    import importlib.util

    import torch

    gc = _gpu_check_module(repo_root)
    find = importlib.util.find_spec

    def find_spec(name, *a):
        if name == "neox_l2e.kernels":
            if missing == "package":
                raise ModuleNotFoundError("No module named 'neox_l2e'")
            return None
        return find(name, *a)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(gc.Runner, "step", lambda *a, **k: pytest.fail("a step ran"))
    assert gc.main(["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install --no-deps --no-build-isolation -e ." in err, err
    assert not (tmp_path / "out").exists()  # nothing left behind


def test_whole_step_error_after_an_oom_keeps_the_micro_batch_and_the_notes(repo_root, monkeypatch):
    """A variant that runs out of memory, then fails otherwise, fit nothing: the next variants start where it
    started, nothing runs again, and its row keeps both notes."""
    import torch

    gc = _gpu_check_module(repo_root)
    build = gc.build_variant

    def broken(cfg, variant, *a, **k):
        model, fn = build(cfg, variant, *a, **k)

        def step(m, b, opt):
            if variant == "hf":
                if b.shape[0] > 1:
                    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
                raise RuntimeError("something else")
            return fn(m, b, opt)

        return model, step

    monkeypatch.setattr(gc, "build_variant", broken)
    rows = gc.whole_step(_tiny_cfg(), ["ours", "hf", "ours+l2e"], 2, 1, 0, torch.device("cpu"), torch.float32, 1.0)
    assert [(r["variant"], r["micro_batch"]) for r in rows] == [("ours", 2), ("hf", 1), ("ours+l2e", 2)]
    assert rows[1].get("median_s") is None
    assert "OOM at micro-batch 2" in rows[1]["note"] and "error: RuntimeError('something else')" in rows[1]["note"]


def test_mfu_goal_reads_the_best_plain_row_at_any_micro_batch(repo_root):
    gc = _gpu_check_module(repo_root)

    def row(variant, mb, mfu):
        return dict(shape="1b", variant=variant, micro_batch=mb, median_s=1.0, tokens_per_s=1.0, tflops=1.0, mfu=mfu)

    rows = [row("ours", 16, 0.47), row("hf", 8, 0.40), row("ours", 8, 0.44)]  # ours again at HF's micro-batch
    goals = gc.step_goal_lines(rows)
    assert "goal 1b MFU >= 45 % (ours, micro-batch 16): 47.0 %: MET" in goals, goals
    assert any(g.startswith("info 1b ours:") and "ours / HF 1.000" in g for g in goals)  # compared at 8


def test_whole_step_reruns_each_variant_once_per_micro_batch(repo_root, monkeypatch):
    """A re-run that itself fits only a smaller micro-batch: the others run again at it, the variant itself
    not a third time."""
    import torch

    gc = _gpu_check_module(repo_root)
    build = gc.build_variant
    builds = {}

    def shrinking(cfg, variant, *a, **k):  # ours fits 4 at first, then (fragmented) 1; HF fits 2
        builds[variant] = builds.get(variant, 0) + 1
        limit = {"hf": 2}.get(variant, 4 if builds[variant] == 1 or variant != "ours" else 1)
        model, fn = build(cfg, variant, *a, **k)

        def step(m, b, opt):
            if b.shape[0] > limit:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
            return fn(m, b, opt)

        return model, step

    monkeypatch.setattr(gc, "build_variant", shrinking)
    rows = gc.whole_step(_tiny_cfg(), ["ours", "hf", "ours+l2e"], 4, 1, 0, torch.device("cpu"), torch.float32, 1.0)
    got = [(r["variant"], r["micro_batch"]) for r in rows]
    assert got == [("ours", 4), ("hf", 2), ("ours", 1), ("hf", 1), ("ours+l2e", 1)], got
    assert rows[3]["note"].startswith("again at micro-batch 1 (ours did not fit 2)")
