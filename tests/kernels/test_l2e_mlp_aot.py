"""The kernels compile for an H100 (sm_90) without a GPU: Triton's compiler and the ptxas it ships run on
the CPU. The list of variants is recorded from the host code (ops.record_launches on meta tensors), so it is
the list the model launches; every boolean kernel flag must be reached both ways by the recorded scenarios."""

import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")


def _run_aot(*args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled, not interpreted
    return subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "neox_l2e.kernels.l2e_mlp.aot_check", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_recorded_variants_cover_every_flag():
    """No compile: the full scenario set reaches every flag both ways, and includes what the model runs
    (no bias, backward without the loss / without dL/dz / without db, the LM-only dx, TF32, transposed
    operands, M = 16384 divisible by 16, N not divisible by 16, M = 1)."""
    proc = _run_aot("--list", timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = proc.stdout
    assert out.rstrip().endswith("ok") and "flag coverage not checked" not in out
    lines = out.splitlines()

    def has(*words):
        return any(all(w in ln.split() for w in words) for ln in lines)

    assert has("gemm_fwd", "-", "save_u", "epilogue")  # HAS_BIAS=False
    assert has("bwd", "-", "has_g")  # HAS_DZ=False (loss only)
    assert has("bwd", "has_dz", "-")  # HAS_G=False (warm-up, tau init, MEmeL)
    assert has("bwd", "store_du_lm")  # l2e_grad_to_input=False
    assert any("bwd" in ln and "need_db" not in ln for ln in lines)  # NEED_DB=False
    assert has("fp32-tf32", "tf32") and has("fp32", "gemm_fwd")
    assert has("gemm_fwd", "strided") and has("bwd", "strided-dz")
    assert has("even:MNK") and has("N%16!=0") and has("M=1")


@pytest.mark.slow
def test_production_variants_compile_for_sm90_without_spills():
    """bf16, erf GELU (the most register-hungry epilogue), Pythia-like shapes, contiguous operands: every
    variant the model can launch there compiles without spills, with FP fusion off and a pipelined GEMM."""
    nv_bin = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not (os.path.exists(os.path.join(nv_bin, "ptxas")) and os.path.exists(os.path.join(nv_bin, "cuobjdump"))):
        pytest.skip("Triton's NVIDIA tools (ptxas, cuobjdump) are not installed")
    proc = _run_aot(
        "--arch", "90", "--dtypes", "bf16", "--approx", "erf", "--shapes", "even", "--layouts", "contiguous"
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = proc.stdout
    assert "pipelined True" in out and "pipelined False" not in out and out.rstrip().endswith("ok")
    assert sum(" regs " in ln for ln in out.splitlines()) >= 16
