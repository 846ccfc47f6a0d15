"""neox-l2e: GPT-NeoX-style Pythia pretraining with L2E (inhibiting monosemantic neurons).

The top-level kernels/ folder is installed as the namespaced package ``neox_l2e.kernels``
(a bare ``kernels`` would clash with an unrelated PyPI package). The C++ helpers
(kernels/csrc: the sample index, the L2E torch path's CPU sweep) are built through pybind11; if they cannot
be compiled, the numpy / torch implementations, which give the same results, are used instead.
"""

import sys

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

try:
    from pybind11.setup_helpers import Pybind11Extension

    ext_modules = [
        Pybind11Extension(
            "neox_l2e.kernels._sample_index", ["kernels/csrc/sample_index.cpp"], cxx_std=17, extra_compile_args=["-O3"]
        ),
        # no FMA contraction: phi = (z - mean)^2 * inv_var must round operation by operation, as torch does
        Pybind11Extension(
            "neox_l2e.kernels._l2e_scan",
            ["kernels/csrc/l2e_scan.cpp"],
            cxx_std=17,
            extra_compile_args=["-O3", "-ffp-contract=off", "-pthread"],
            extra_link_args=["-pthread"],
        ),
    ]
except ImportError:  # pybind11 missing: the numpy / torch fallbacks are used
    ext_modules = []


class OptionalBuildExt(build_ext):
    """Build the C++ helpers, but never fail the install over them (numpy / torch fallbacks exist)."""

    def run(self):
        try:
            super().run()
        except Exception as e:  # noqa: BLE001 - report and fall back
            print(f"warning: C++ helpers not built ({e}); using the numpy / torch fallbacks", file=sys.stderr)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001
            print(f"warning: {ext.name} not built ({e}); using its numpy / torch fallback", file=sys.stderr)


packages = [p for p in find_packages(include=["neox_l2e", "neox_l2e.*"])]
packages += ["neox_l2e.kernels"] + ["neox_l2e.kernels." + p for p in find_packages("kernels")]

setup(
    name="neox-l2e",
    version="0.1.0",
    description="GPT-NeoX-style Pythia pretraining with L2E monosemantic-neuron inhibition",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"neox_l2e": "neox_l2e", "neox_l2e.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": OptionalBuildExt},
    # DeepSpeed: the range the test suite ran with (tools/install.sh installs the same)
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.19.8,<0.20",
        "numpy",
        "pyyaml",
        "tqdm",
        "safetensors",
        "sentencepiece",
        "transformers",
    ],
)
