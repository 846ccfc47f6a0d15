"""Compile the kernels ahead of time for a CUDA target, without a GPU, and check their resources.

    python -m neox_l2e.kernels.l2e_mlp.aot_check [--arch 90] [--dtypes bf16,fp16,fp32]

For every kernel of the default GPU launch configuration (``GPU_CONFIG``), both GELU variants and each
dtype, it runs Triton's full compiler (TTIR -> TTGIR -> LLVM -> PTX -> cubin through the ptxas that
ships with Triton) and reads the cubin's resource usage and static SASS instruction count (cuobjdump;
for the loop-free element-wise kernels also per element, a proxy for their issue cost). It fails (exit 1) when a kernel
spills registers (a stack frame above MAX_STACK_BYTES) or when the fused-gemm main loop is not software-pipelined (no
multi-buffered shared-memory operands). It says nothing about speed.

Arguments are specialised the way the JIT specialises a launch at the Pythia shapes: pointers 16-byte
aligned; N, K and the row strides divisible by 16; unit strides constant; and both with shapes that are
multiples of the tiles (EVEN_*: no bounds masks, the Pythia case) and with ragged edges. Must run with
TRITON_INTERPRET unset (the kernels are then compiled, not interpreted); the script clears it itself
when run as a module, before triton is imported.
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile

# a few bytes of stack are not spills: the fp32 kernels keep a 4-byte local array where boolean masks
# are packed to bytes (st.b8 / ld.b16 on __local_depot in the PTX); real spills are hundreds of bytes
MAX_STACK_BYTES = 16

_TY = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def _signatures(dtype: str, cfg, approx_tanh: bool, even: bool):
    """(name, kernel attribute, {arg: type}, constexprs, options) for each kernel as ops.py launches it."""
    p = _TY[dtype]
    f32, i32 = "*fp32", "*i32"
    out = []
    sig = dict(u_ptr=p, z_ptr=p, mean_ptr=f32, inv_var_ptr=f32, pmean_ptr=f32, pm2_ptr=f32,
               psel_ptr=i32, ploss_ptr=f32, M="i32", N="i32", tau="fp32", eps="fp32")
    out.append(("split_fwd", "_split_fwd_kernel", sig,
                dict(APPROX_TANH=approx_tanh, BF16_RNE=False, FAST_LOG=cfg.fast_log,
                     EVEN_M=even, EVEN_N=even,
                     BLOCK_M=cfg.ew_block_m, BLOCK_N=cfg.ew_block_n), dict(num_warps=cfg.ew_warps)))
    bk = min(cfg.mm_block_k, 32) if dtype == "fp32" else cfg.mm_block_k
    sig = dict(x_ptr=p, w_ptr=p, bias_ptr=p, u_ptr=p, z_ptr=p, mean_ptr=f32, inv_var_ptr=f32, pmean_ptr=f32,
               pm2_ptr=f32, psel_ptr=i32, ploss_ptr=f32, M="i32", N="i32", K="i32", stride_xm="i32",
               stride_xk="constexpr", stride_wn="i32", stride_wk="constexpr", tau="fp32", eps="fp32")
    for save, epi in ((True, True), (False, True), (True, False)):
        out.append((f"gemm_fwd(save={save},epilogue={epi})", "_gemm_fwd_kernel", sig,
                    dict(stride_xk=1, stride_wk=1, HAS_BIAS=True, SAVE_U=save, EPILOGUE=epi,
                         APPROX_TANH=approx_tanh, BF16_RNE=False, DOT_FP32=False,
                         INPUT_PRECISION="ieee" if dtype == "fp32" else None, GROUP_M=cfg.mm_group_m,
                         FAST_LOG=cfg.fast_log, EVEN_M=even, EVEN_N=even, EVEN_K=even,
                         BLOCK_M=cfg.mm_block_m, BLOCK_N=cfg.mm_block_n, BLOCK_K=bk),
                    dict(num_warps=cfg.mm_warps, num_stages=cfg.mm_stages)))
    sig = dict(pmean_ptr=f32, pm2_ptr=f32, mean_out_ptr=f32, m2_out_ptr=f32, M="i32", N="i32", P="i32")
    out.append(("merge_moments", "_merge_moments_kernel", sig,
                dict(BLOCK_M=cfg.ew_block_m, BLOCK_P=cfg.merge_block_p, BLOCK_N=cfg.merge_block_n), dict(num_warps=4)))
    sig = dict(u_ptr=p, dz_ptr=p, g_ptr=f32, mean_ptr=f32, inv_var_ptr=f32, du_ptr=p, pdb_ptr=f32,
               M="i32", N="i32", stride_dzm="i32", stride_dzn="constexpr", tau="fp32", eps="fp32")
    out.append(("bwd", "_bwd_kernel", sig,
                dict(stride_dzn=1, NEED_DB=True, HAS_DZ=True, HAS_G=True, APPROX_TANH=approx_tanh,
                     BF16_RNE=False,
                     EVEN_M=even, EVEN_N=even, BLOCK_M=cfg.ew_block_m, BLOCK_N=cfg.ew_block_n),
                dict(num_warps=cfg.ew_warps)))
    return out


def check(arch: int = 90, dtypes=("bf16", "fp16", "fp32"), approx=("erf", "tanh"), verbose: bool = True) -> list:
    """Compile everything; return a list of problems (empty when all is well)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import _triton as K
    from .ops import GPU_CONFIG

    if getattr(K._gemm_fwd_kernel, "arg_names", None) is None or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("TRITON_INTERPRET is set: the kernels are interpreted functions; unset it first")
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    target = GPUTarget("cuda", arch, 32)
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in dtypes:
            tanh_flags = [a == "tanh" for a in approx]
            for approx_tanh, even in itertools.product(tanh_flags, (True, False)):
                for name, attr, types, consts, opts in _signatures(dtype, GPU_CONFIG, approx_tanh, even):
                    if attr == "_merge_moments_kernel" and not even:
                        continue
                    fn = getattr(K, attr)
                    sig = {}
                    for a in fn.arg_names:
                        sig[a] = types.get(a, "constexpr")
                    div = [i for i, a in enumerate(fn.arg_names)
                           if sig[a].startswith("*") or a in ("N", "K", "stride_xm", "stride_wn", "stride_dzm")]
                    attrs = {(i,): [["tt.divisibility", 16]] for i in div}
                    kern = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                                          target=target, options=opts)
                    path = os.path.join(tmp, "k.cubin")
                    with open(path, "wb") as f:
                        f.write(kern.asm["cubin"])
                    res = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True).stdout
                    m = re.search(r"REG:(\d+) STACK:(\d+)", res)
                    regs, stack = (int(m.group(1)), int(m.group(2))) if m else (-1, -1)
                    sass = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True).stdout
                    n_sass = len(re.findall(r"^\s+/\*[0-9a-f]{4}\*/\s+\S", sass, flags=re.M))
                    per_elem = ""
                    if attr in ("_split_fwd_kernel", "_bwd_kernel"):  # loop-free: static count = executed
                        elems = GPU_CONFIG.ew_block_m * GPU_CONFIG.ew_block_n / (32 * opts["num_warps"])
                        per_elem = f" ({n_sass / elems:.1f} per element)"
                    ttgir = kern.asm["ttgir"]
                    multibuf = bool(re.search(r"memdesc<[2-9]x\d+x\d+x", ttgir))
                    label = f"{dtype} {'tanh' if approx_tanh else 'erf '} {'even ' if even else 'edges'} {name}"
                    if verbose:
                        print(f"{label:<52} regs {regs:>3}  stack {stack:>4} B  shared {kern.metadata.shared:>6} B"
                              + f"  SASS {n_sass:>5}{per_elem}"
                              + (f"  pipelined {multibuf}" if attr == "_gemm_fwd_kernel" else ""))
                    if stack > MAX_STACK_BYTES:
                        problems.append(f"{label}: {stack} B stack frame (register spills)")
                    if attr == "_gemm_fwd_kernel" and opts.get("num_stages", 1) > 1 and not multibuf:
                        problems.append(f"{label}: GEMM main loop not pipelined")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    ap.add_argument("--dtypes", default="bf16,fp16,fp32")
    ap.add_argument("--approx", default="erf,tanh", help="GELU variants: erf, tanh")
    args = ap.parse_args(argv)
    problems = check(args.arch, tuple(d for d in args.dtypes.split(",") if d),
                     tuple(a for a in args.approx.split(",") if a))
    for p in problems:
        print("PROBLEM:", p)
    print("ok" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)  # effective only if triton was not imported yet
    sys.exit(main())
