"""Compile the kernels ahead of time for a CUDA target, without a GPU, and check their resources.

    python -m neox_l2e.kernels.l2e_mlp.aot_check [--arch 90] [--dtypes bf16,fp16,fp32,fp32-tf32]
        [--approx erf,tanh] [--shapes even,ragged,one-row] [--layouts contiguous,strided] [--list]

The list of kernel variants is not written here: it is recorded from the host code itself. For every
combination of what a caller can choose (dtype, TF32 allowed or not, GELU variant, mode, bias or none, save or
recompute the pre-activation, contiguous or transposed x / W / dL/dz, which gradients flow back -- dL/dz and the
loss, dL/dz only, the loss only -- and ``l2e_grad_to_input``) and a few shapes, ``ops._apply_kernels`` and its
backward run on ``meta`` tensors inside ``ops.record_launches()``; every launch they would make is collected
with its arguments and compile options, and specialised exactly as Triton's JIT specialises it (Triton's
own binder: 16-byte-aligned pointers, integers divisible by 16, integers equal to 1 as constants). A new
kernel flag therefore shows up here by itself; a boolean flag that no recorded launch sets both ways (except the
interpreter-only ones) is reported as a problem, so a flag that the scenarios cannot reach is not missed.

Shapes (T, h, N): even = (16384, 1024, 4096) (Pythia-like: multiples of every tile, T = 8 x 2048), ragged =
(1000, 1000, 1000) (no dimension divisible by 16), one-row = (1, 1024, 4096) (Triton turns M = 1 into a constant).

Each unique variant goes through Triton's full compiler (TTIR -> TTGIR -> LLVM -> PTX -> cubin through the
ptxas that ships with Triton); the cubin's registers, stack and static SASS instruction count are read with
cuobjdump (for the loop-free element-wise kernels also per element, a proxy for their issue cost). It fails
(exit 1) when a kernel spills registers (a stack frame above MAX_STACK_BYTES), when the fused-gemm main loop is
not software-pipelined (no multi-buffered shared-memory operands) although h and N are divisible by 16 (rows
that are not 16-byte aligned cannot use asynchronous copies: a note, not a failure), when FP fusion is on, or on
a coverage gap.
It says nothing about speed. Must run with TRITON_INTERPRET unset (the kernels are then compiled, not
interpreted); the script clears it itself when run as a module, before triton is imported.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from typing import Dict, List, Tuple

# a few bytes of stack are not spills: the fp32 kernels keep a 4-byte local array where boolean masks
# are packed to bytes (st.b8 / ld.b16 on __local_depot in the PTX); real spills are hundreds of bytes
MAX_STACK_BYTES = 16

SHAPES = {"even": (16384, 1024, 4096), "ragged": (1000, 1000, 1000), "one-row": (1, 1024, 4096)}
DTYPES = ("bf16", "fp16", "fp32", "fp32-tf32")
APPROX = {"erf": "none", "tanh": "tanh"}
LAYOUTS = ("contiguous", "strided")
# backward requests: which outputs carry a gradient
GRADS = ("dz+loss", "dz", "loss")
# boolean constexprs that are constant in compiled code by design (interpreter-only work-arounds, config flags)
CONSTANT_FLAGS = {"BF16_RNE", "DOT_FP32", "FAST_LOG"}


@dataclass(frozen=True)
class Scenario:
    dtype: str
    approx: str
    mode: str
    bias: bool
    save_preact: bool
    layout: str
    shape: str


@dataclass
class Variant:
    """One unique compile: a recorded launch, the scenario that first produced it, the JIT's specialisation."""

    launch: object
    scenario: Scenario
    key: tuple


def scenarios(dtypes=DTYPES, approx=tuple(APPROX), shapes=tuple(SHAPES), layouts=LAYOUTS):
    for d, a, mode, bias, save, lay, shp in itertools.product(
        dtypes, approx, ("split", "fused-gemm"), (True, False), (True, False), layouts, shapes
    ):
        yield Scenario(d, a, mode, bias, save, lay, shp)


@contextlib.contextmanager
def _tf32(allow: bool):
    import torch

    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def record(sc: Scenario, cfg) -> list:
    """The launches one caller scenario makes: forward, then each backward request, on meta tensors."""
    import torch

    from . import ops

    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp32-tf32": torch.float32}[sc.dtype]
    T, h, N = SHAPES[sc.shape]
    strided = sc.layout == "strided"

    def mat(r, c, dtype=dt):  # [r, c], or the transposed view of a [c, r] tensor (non-unit column stride)
        return (
            torch.empty((c, r), dtype=dtype, device="meta").t()
            if strided
            else torch.empty((r, c), dtype=dtype, device="meta")
        )

    mean = torch.empty((N,), dtype=torch.float32, device="meta")
    inv_var = torch.empty((N,), dtype=torch.float32, device="meta")
    cfg = replace(cfg, save_preact=sc.save_preact)
    with _tf32(sc.dtype == "fp32-tf32"), ops.record_launches() as launches:
        for grads, to_input in itertools.product(GRADS, (True, False)):
            x, w = mat(T, h).requires_grad_(), mat(N, h).requires_grad_()
            b = torch.empty((N,), dtype=dt, device="meta").requires_grad_() if sc.bias else None
            z, loss, _, _ = ops._apply_kernels(
                x, w, b, mean, inv_var, 1.0, 1e-6, APPROX[sc.approx], sc.mode, cfg, l2e_grad_to_input=to_input
            )
            outs, gs = [], []
            if "dz" in grads:
                outs.append(z)
                gs.append(mat(T, N))
            if "loss" in grads:
                outs.append(loss)
                gs.append(torch.ones((), dtype=torch.float32, device="meta"))
            torch.autograd.backward(outs, gs)
    return list(launches)


def _unfiltered(dtypes, approx, shapes, layouts) -> bool:
    return (set(dtypes), set(approx), set(shapes), set(layouts)) == (
        set(DTYPES),
        set(APPROX),
        set(SHAPES),
        set(LAYOUTS),
    )


def _binder(kernel_name: str, backend):
    from triton.runtime.jit import create_function_from_signature

    from . import _triton as K

    fn = getattr(K, kernel_name)
    return fn, create_function_from_signature(fn.signature, fn.params, backend)


def collect(
    arch: int = 90, dtypes=DTYPES, approx=tuple(APPROX), shapes=tuple(SHAPES), layouts=LAYOUTS
) -> Tuple[List[Variant], List[str]]:
    """Record every scenario's launches and keep one per JIT specialisation; also return coverage problems
    (checked only when no axis is filtered: then every boolean flag must be reached both ways)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    from .ops import GPU_CONFIG

    backend = make_backend(GPUTarget("cuda", arch, 32))
    binders: Dict[str, tuple] = {}
    variants: Dict[tuple, Variant] = {}
    seen = collections.defaultdict(lambda: collections.defaultdict(set))  # kernel -> flag -> values
    for sc in scenarios(dtypes, approx, shapes, layouts):
        for ln in record(sc, GPU_CONFIG):
            if ln.kernel not in binders:
                binders[ln.kernel] = _binder(ln.kernel, backend)
            _, binder = binders[ln.kernel]
            _, spec, _ = binder(**ln.args, **ln.options)
            key = (ln.kernel, tuple(map(str, spec)), tuple(sorted(ln.options.items())))
            variants.setdefault(key, Variant(ln, sc, key))
            for k, v in ln.args.items():
                if isinstance(v, bool):
                    seen[ln.kernel][k].add(v)
    problems = []
    full = _unfiltered(dtypes, approx, shapes, layouts)
    for kernel, flags in sorted(seen.items()) if full else ():  # a filtered run cannot reach every value
        for flag, vals in sorted(flags.items()):
            if len(vals) < 2 and flag not in CONSTANT_FLAGS:
                problems.append(
                    f"{kernel}: flag {flag} is always {next(iter(vals))} in the recorded launches "
                    "(add a scenario that reaches the other value, or list it in CONSTANT_FLAGS)"
                )
    return list(variants.values()), problems


def describe(v: Variant) -> str:
    """A short label: dtype, GELU, kernel and the flags that tell this variant apart."""
    a = v.launch.args
    name = v.launch.kernel.strip("_").replace("_kernel", "")
    bits = [f"{v.scenario.dtype:<9}", "tanh" if a.get("APPROX_TANH") else "erf ", f"{name:<13}"]
    for flag in ("HAS_BIAS", "SAVE_U", "EPILOGUE", "HAS_DZ", "HAS_G", "NEED_DB", "STORE_DU_LM"):
        if flag in a:
            bits.append(flag.lower() if a[flag] else "-")
    even = "".join(c for c, f in (("M", "EVEN_M"), ("N", "EVEN_N"), ("K", "EVEN_K")) if a.get(f))
    bits.append(f"even:{even or '-'}")
    spec = dict(zip(_arg_names(v), v.key[1]))
    for arg in ("M", "N", "K"):
        s = spec.get(arg, "")
        if "constexpr" in s:
            bits.append(f"{arg}=1")
        elif arg in spec and "'D'" not in s:
            bits.append(f"{arg}%16!=0")
    if v.launch.kernel == "_gemm_fwd_kernel" and a["stride_xk"] != 1:
        bits.append("strided")
    if v.launch.kernel == "_bwd_kernel" and a["HAS_DZ"] and a["stride_dzn"] != 1:
        bits.append("strided-dz")
    if v.launch.kernel == "_merge_moments_kernel":
        bits.append(f"block_n:{a['BLOCK_N']}")
    if a.get("INPUT_PRECISION") == "tf32":
        bits.append("tf32")
    return " ".join(bits)


def _arg_names(v: Variant) -> list:
    from . import _triton as K

    return list(getattr(K, v.launch.kernel).arg_names)


def check(
    arch: int = 90,
    dtypes=DTYPES,
    approx=tuple(APPROX),
    shapes=tuple(SHAPES),
    layouts=LAYOUTS,
    verbose: bool = True,
    list_only: bool = False,
) -> list:
    """Record, compile and check everything; return a list of problems (empty when all is well)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    from . import _triton as K

    if getattr(K._gemm_fwd_kernel, "arg_names", None) is None or os.environ.get("TRITON_INTERPRET", "0") not in (
        "",
        "0",
    ):
        raise RuntimeError("TRITON_INTERPRET is set: the kernels are interpreted functions; unset it first")
    variants, problems = collect(arch, dtypes, approx, shapes, layouts)
    notes: List[str] = []
    if verbose:
        print(
            f"{len(variants)} unique kernel variants recorded from the host code"
            + ("" if _unfiltered(dtypes, approx, shapes, layouts) else " (filtered: flag coverage not checked)")
        )
    if list_only:
        for v in variants:
            print(describe(v))
        return problems
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    with tempfile.TemporaryDirectory() as tmp:
        for v in variants:
            ln = v.launch
            fn = getattr(K, ln.kernel)
            _, binder = _binder(ln.kernel, backend)
            bound, spec, opts = binder(**ln.args, **ln.options)
            options, sig, constexprs, attrs = fn._pack_args(backend, opts, bound, spec, opts)  # as JIT.run does
            kern = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=target, options=options.__dict__)
            path = os.path.join(tmp, "k.cubin")
            with open(path, "wb") as f:
                f.write(kern.asm["cubin"])
            res = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True).stdout
            m = re.search(r"REG:(\d+) STACK:(\d+)", res)
            regs, stack = (int(m.group(1)), int(m.group(2))) if m else (-1, -1)
            sass = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True).stdout
            n_sass = len(re.findall(r"^\s+/\*[0-9a-f]{4}\*/\s+\S", sass, flags=re.M))
            per_elem = ""
            if ln.kernel in ("_split_fwd_kernel", "_bwd_kernel"):  # loop-free: static count = executed
                elems = ln.args["BLOCK_M"] * ln.args["BLOCK_N"] / (32 * ln.options["num_warps"])
                per_elem = f" ({n_sass / elems:.1f}/elem)"
            multibuf = bool(re.search(r"memdesc<[2-9]x\d+x\d+x", kern.asm["ttgir"]))
            label = describe(v)
            if verbose:
                print(
                    f"{label:<86} regs {regs:>3} stack {stack:>3} B smem {kern.metadata.shared:>6} B"
                    + f" SASS {n_sass:>5}{per_elem}"
                    + (f" pipelined {multibuf}" if ln.kernel == "_gemm_fwd_kernel" else ""),
                    flush=True,
                )
            if stack > MAX_STACK_BYTES:
                problems.append(f"{label}: {stack} B stack frame (register spills)")
            if ln.kernel == "_gemm_fwd_kernel" and ln.options.get("num_stages", 1) > 1 and not multibuf:
                if ln.args["K"] % 16 == 0 and ln.args["N"] % 16 == 0:
                    problems.append(f"{label}: GEMM main loop not pipelined")
                else:  # rows not 16-byte aligned: no cp.async; correct, slower ("split" is the mode for such shapes)
                    notes.append(f"{label}: GEMM main loop not pipelined (h or N not divisible by 16)")
            if getattr(kern.metadata, "enable_fp_fusion", False):
                problems.append(f"{label}: compiled with FP fusion on")
    for n in notes:
        print("note:", n)
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="bf16, fp16, fp32 (TF32 off), fp32-tf32")
    ap.add_argument("--approx", default="erf,tanh", help="GELU variants: erf, tanh")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="even, ragged, one-row")
    ap.add_argument("--layouts", default=",".join(LAYOUTS), help="contiguous, strided")
    ap.add_argument("--list", action="store_true", help="only list the recorded variants (no compile)")
    args = ap.parse_args(argv)

    def split(s):
        return tuple(t for t in s.split(",") if t)

    for name, vals, allowed in (
        ("--dtypes", split(args.dtypes), DTYPES),
        ("--approx", split(args.approx), APPROX),
        ("--shapes", split(args.shapes), SHAPES),
        ("--layouts", split(args.layouts), LAYOUTS),
    ):
        bad = [v for v in vals if v not in allowed]
        if bad:
            ap.error(f"{name}: unknown {', '.join(bad)} (choose from {', '.join(allowed)})")
    problems = check(
        args.arch, split(args.dtypes), split(args.approx), split(args.shapes), split(args.layouts), list_only=args.list
    )
    for p in problems:
        print("PROBLEM:", p)
    print("ok" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)  # effective only if triton was not imported yet
    sys.exit(main())
