"""The kernels compile for an H100 (sm_90) without a GPU: Triton's compiler and the ptxas it ships run on
the CPU. Checks the default GPU launch configuration: no register spills, a pipelined GEMM main loop.
bf16 with the erf GELU only (the most register-hungry epilogue), to keep the test folder quick."""
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")


@pytest.mark.slow
def test_default_gpu_config_compiles_for_sm90_without_spills():
    nv_bin = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not (os.path.exists(os.path.join(nv_bin, "ptxas")) and os.path.exists(os.path.join(nv_bin, "cuobjdump"))):
        pytest.skip("Triton's NVIDIA tools (ptxas, cuobjdump) are not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled, not interpreted
    proc = subprocess.run([sys.executable, "-W", "ignore", "-m", "neox_l2e.kernels.l2e_mlp.aot_check",
                           "--arch", "90", "--dtypes", "bf16", "--approx", "erf"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "pipelined True" in proc.stdout and proc.stdout.rstrip().endswith("ok")
