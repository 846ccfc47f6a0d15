"""tools/bench_kernels.py through its own functions on CPU: the fused variants (both modes, saved and recomputed
pre-activation) and the bare Triton GEMM run in Triton's interpreter at a tiny shape, so a signature drift
between the script and the kernel package fails here rather than on the first GPU."""

import csv
import importlib.util

import pytest

from neox_l2e.kernels.l2e_mlp import interpreter_enabled


def _load(repo_root):
    spec = importlib.util.spec_from_file_location("bench_kernels", repo_root / "tools" / "bench_kernels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not interpreter_enabled(), reason="needs TRITON_INTERPRET=1 (tests/conftest.py sets it on CPU)")
def test_bench_kernels_fused_path_runs_on_the_interpreter(repo_root, tmp_path, capsys):
    bench = _load(repo_root)
    assert not bench.CUDA
    out = tmp_path / "bench.csv"
    rc = bench.main(
        [
            "--tokens",
            "32",
            "--shapes",
            "32",
            "--interpret-fused",
            "--preact",
            "both",
            "--rounds",
            "1",
            "--no-compile",
            "--cpu-min-runs",
            "1",
            "--warmup",
            "0",
            "--csv",
            str(out),
        ]
    )
    assert rc == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    got = {(r["variant"], r["pass"]): r for r in rows}
    want = [(f"fused:{m}{r}", p) for m in ("split", "fused-gemm") for r in ("", ":recompute") for p in ("fwd", "bwd")]
    want += [("floor", "fwd"), ("floor", "bwd"), ("torch-l2e", "fwd"), ("gemm:torch", "fwd"), ("gemm:triton", "fwd")]
    for key in want:
        assert key in got, (key, sorted(got))
        assert got[key]["ms"] not in ("", None) and float(got[key]["ms"]) > 0, got[key]
    assert not any("Error" in r["note"] for r in rows), [r["note"] for r in rows]
    assert "| fused:split |" in capsys.readouterr().out
    # the goal lines are computed from the same rows (printed on CUDA only)
    rows_d = [
        dict(
            r,
            pass_=r["pass"],
            ms=float(r["ms"]),
            x_floor=float(r["x_floor"] or 0) or None,
            vs_torch=float(r["vs_torch"] or 0) or None,
        )
        for r in rows
    ]
    lines = bench.goal_lines(rows_d)
    assert len(lines) == 2 and all(ln.startswith("goal 32 fused:") for ln in lines)


def test_bench_kernels_host_measurement_on_cpu(repo_root, capsys):
    """--host on CPU: the host code's microseconds per call with the Triton launches recorded (not run), and the
    launches one forward / forward + backward makes, counted on meta tensors at the requested shape."""
    bench = _load(repo_root)
    rc = bench.main(["--host", "--host-calls", "3", "--rounds", "1", "--tokens", "128", "--shapes", "70m"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "excludes Triton's launcher" in out
    rows = {tuple(c.strip() for c in ln.split("|")[1:3]): ln for ln in out.splitlines() if ln.startswith("| ")}

    def cells(variant, pas):
        c = [x.strip() for x in rows[(variant, pas)].split("|")[1:-1]]
        return float(c[2]), int(c[3]), int(c[4]), c[6]

    us, triton_n, torch_n, launched = cells("fused:split", "fwd")
    assert us > 0 and triton_n == 2 and torch_n == 1  # the epilogue pass and the merge; cuBLAS addmm
    assert launched == "split_fwd merge_moments ; addmm"
    us, triton_n, torch_n, launched = cells("fused:split", "fwd+bwd")
    assert us > 0 and triton_n == 3 and "bwd" in launched.split(";")[0].split()
    assert launched.split(";")[1].split().count("mm") == 2  # dx, dW
    us, triton_n, torch_n, _ = cells("fused:fused-gemm", "fwd")
    assert us > 0 and triton_n == 2 and torch_n == 0
    assert cells("floor", "fwd")[1:3] == (0, 2)  # addmm, gelu
