"""tools/gpu_check.py on a machine without a CUDA device: one line that says so, exit status 0."""

import os
import subprocess
import sys


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
