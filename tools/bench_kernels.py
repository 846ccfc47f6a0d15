#!/usr/bin/env python
"""Benchmark the fused MLP up-projection + GELU + L2E kernel against its alternatives.

For each Pythia MLP shape (x [T, h] times W [4h, h]^T) and each pass (forward, backward) it times
    fused:<mode>   neox_l2e.kernels.l2e_mlp.fused_up_gelu_l2e (modes "split" and "fused-gemm"); with
                   ":recompute" the pre-activation is recomputed in backward instead of saved
    floor          cuBLAS GEMM + bias + GELU, no L2E statistics (F.gelu(F.linear(x, W, b)))
    torch-l2e      the unfused torch L2E path as the inhibitor's torch backend runs it (fp32 z, functional ops)
    compiled-l2e   torch.compile of the torch-l2e path
and, forward only, the bare GEMMs: gemm:torch (torch.mm: cuBLAS on CUDA) and gemm:triton (the fused-gemm kernel's GEMM,
no epilogue), so the table says where the Triton GEMM is slower than cuBLAS.

Metrics: ms (median), TFLOP/s (2 T N h forward, 4 T N h backward), GB/s over a nominal byte count (the
tensors any implementation must touch: forward x, W, b, z; backward dz, u, x, W, dx, dW; the same formula
for every variant, so it is a normalised speed, not measured traffic), x_floor = ms / floor ms,
vs_torch = torch-l2e ms / ms (speed-up over the unfused path).

CUDA: triton.testing.do_bench. Without CUDA a CPU timer runs a smoke-sized problem (--tokens, --shapes);
the fused variants need Triton's interpreter there and are skipped unless --interpret-fused.

    python tools/bench_kernels.py --csv bench_l2e_mlp.csv                      # on a GPU
    python tools/bench_kernels.py --tokens 256 --shapes 70m --csv smoke.csv    # CPU smoke run

tools/gpu_check.py runs this script once per shape (with a timeout each) and merges the results.

--host measures the host cost per call of fused_up_gelu_l2e (and of the floor) at a small shape, where the GPU
work is a few microseconds and the host code and the launches set the pace (default T = 128, 70m: h = 512,
N = 2048), for the forward and for forward + backward (torch.autograd.grad: no gradient accumulation):
    CUDA: wall time per call of --host-calls back-to-back calls with one synchronisation at the end; it includes
          Triton's launcher and the torch ops' launches (launch-bound: it is the host cost whenever the GPU keeps up)
    CPU:  the host code alone, kernel launches recorded (ops.record_launches), not run: it excludes Triton's
          launcher (argument binding, the driver call) and any device work. It runs on tiny CPU tensors
          (T = 8, h = 16, N = 64: the host code does not depend on the shape), where the torch ops it calls
          cost their dispatch and microseconds of compute; on meta tensors some of them (addmm, gelu) are Python
          meta functions of a few hundred microseconds, which would swamp the figure
and, per call at the requested shape, the Triton launches and the torch ops that launch device work (counted
on meta tensors).

    python tools/bench_kernels.py --host                                       # GPU or CPU
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import time

SHAPES = {"70m": 512, "410m": 1024, "2.8b": 2560, "6.9b": 4096, "12b": 5120}
DEFAULT_SHAPES = ["70m", "410m", "2.8b", "6.9b"]  # on CUDA without --shapes; 12b on request (gpu_check asks)
CSV_COLUMNS = ["shape", "h", "N", "T", "pass", "variant", "ms", "tflops", "gbs", "x_floor", "vs_torch", "note"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--shapes",
        default=None,
        help="comma list of Pythia sizes (70m,410m,2.8b,6.9b,12b) or hidden sizes h; "
        "default: 70m..6.9b on CUDA, 70m on CPU",
    )
    p.add_argument(
        "--tokens", type=int, default=None, help="token rows T (default 8 x 2048 = 16384 on CUDA, 256 on CPU)"
    )
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--approximate", default="none", choices=["none", "tanh"])
    p.add_argument("--modes", default="split,fused-gemm", help="fused kernel modes to time")
    p.add_argument(
        "--preact",
        default=None,
        choices=["save", "recompute", "both"],
        help="fused variants keep the pre-activation for backward, recompute it, or time both "
        "(rows fused:<mode> and fused:<mode>:recompute); default both on CUDA, save on CPU",
    )
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    p.add_argument(
        "--interpret-fused",
        action="store_true",
        help="on CPU, time the fused variants in Triton's interpreter (very slow)",
    )
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup ms (CUDA) / iterations (CPU: 1)")
    p.add_argument("--rep", type=int, default=100, help="do_bench rep ms (CUDA); CPU: at least 3 runs")
    p.add_argument(
        "--rounds", type=int, default=3, help="time all variants once per round, this many rounds; report the median"
    )
    p.add_argument("--cpu-min-runs", type=int, default=3, help="CPU timer: at least this many timed runs")
    p.add_argument("--csv", default=None, help="write the rows to this CSV file (not with --host)")
    p.add_argument(
        "--host",
        action="store_true",
        help="host microseconds per call at a small shape (default --tokens 128 --shapes 70m); see above",
    )
    p.add_argument("--host-calls", type=int, default=200, help="--host: calls per timed round")
    return p.parse_args(argv)


if __name__ == "__main__" and "--interpret-fused" in sys.argv[1:] and not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (the kernels import it lazily)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from neox_l2e.l2e import functional  # noqa: E402
from neox_l2e.l2e.torch_op import l2e_mlp_torch  # noqa: E402

CUDA = torch.cuda.is_available()
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def timer(fn, args, grad_to_none=None):
    """Median milliseconds of fn()."""
    if CUDA:
        import triton.testing

        return triton.testing.do_bench(
            fn, warmup=args.warmup, rep=args.rep, grad_to_none=grad_to_none, return_mode="median"
        )
    for _ in range(min(2, args.cpu_min_runs)):  # warmup (and any lazy compilation)
        fn()
    times = []
    t_end = time.perf_counter() + 0.3
    while len(times) < args.cpu_min_runs or (time.perf_counter() < t_end and len(times) < 20):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def torch_l2e(x, w, b, mean, inv_var, tau, eps, approximate):
    """The unfused torch path: the inhibitor's torch backend (neox_l2e.l2e.torch_op, the one torch implementation of
    the L2E forward), with the fused op's contract z, loss_sum, n_sel, moments."""
    return l2e_mlp_torch(x, w, b, mean, inv_var, tau, eps, approximate)


def floor_path(x, w, b, approximate):
    return F.gelu(F.linear(x, w, b), approximate=approximate)


def bench_shape(name, h, T, dtype, rows, args):
    """Time every variant at x [T, h], W [4h, h]; append one row per (variant, pass) to ``rows``."""
    dev = "cuda" if CUDA else "cpu"
    N = 4 * h
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(T, h, generator=g).to(dev, dtype).requires_grad_()
    w = (torch.randn(N, h, generator=g) / math.sqrt(h)).to(dev, dtype).requires_grad_()
    b = (0.1 * torch.randn(N, generator=g)).to(dev, dtype).requires_grad_()
    with torch.no_grad():  # running statistics from a sample of the batch, threshold at 3 sigma
        _, mu, m2 = functional.batch_moments(floor_path(x[: min(T, 1024)], w, b, args.approximate))
        cnt = min(T, 1024)
        mean = mu.float().contiguous()
        inv_var = functional.inv_var_from_stats(torch.full_like(m2, cnt), m2, 2).contiguous()
    tau, eps = 9.0, 1e-6
    gz = torch.randn(T, N, generator=g).to(dev, dtype)
    gl = torch.tensor(1e-3 / max(1, T), device=dev)
    leaves = [x, w, b]
    e = torch.finfo(dtype).bits // 8
    flops = {"fwd": 2.0 * T * N * h, "bwd": 4.0 * T * N * h}
    nbytes = {"fwd": e * (T * h + N * h + N + T * N), "bwd": e * (2 * T * N + 2 * T * h + 2 * N * h)}

    variants = []
    fused_ok = CUDA or args.interpret_fused
    if fused_ok:
        from neox_l2e.kernels.l2e_mlp import fused_up_gelu_l2e

        preact = args.preact or ("both" if CUDA else "save")
        saves = {"save": [True], "recompute": [False], "both": [True, False]}[preact]
        for mode in [m for m in args.modes.split(",") if m]:
            for save in saves:
                variants.append(
                    (
                        f"fused:{mode}" + ("" if save else ":recompute"),
                        (
                            lambda mode=mode, save=save: fused_up_gelu_l2e(
                                x, w, b, mean, inv_var, tau, eps, args.approximate, mode, save_preact=save
                            )
                        ),
                        True,
                    )
                )
    variants.append(("floor", lambda: (floor_path(x, w, b, args.approximate),), False))
    variants.append(("torch-l2e", lambda: torch_l2e(x, w, b, mean, inv_var, tau, eps, args.approximate), True))
    if not args.no_compile:
        compiled = torch.compile(torch_l2e, dynamic=False)  # specialised per shape, like the kernels
        variants.append(("compiled-l2e", lambda: compiled(x, w, b, mean, inv_var, tau, eps, args.approximate), True))

    # prepare every variant (compile, warm up, keep one graph for the backward timings) ...
    prepared, results = {}, {}
    for vname, fn, has_loss in variants:
        try:
            fn()
            out = fn()
            outs, grads = [out[0]], [gz]
            if has_loss:
                outs.append(out[1])
                grads.append(gl)

            def bwd(outs=outs, grads=grads):
                torch.autograd.backward(outs, grads, retain_graph=True)

            bwd()
            prepared[vname] = {"fwd": fn, "bwd": bwd}
        except Exception as exc:  # noqa: BLE001 - a variant that cannot run is reported, not fatal
            results[vname] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
        for t in leaves:
            t.grad = None

    # ... and the bare GEMMs (forward): is the Triton GEMM slower than cuBLAS at this shape?
    def no_grad(f):
        def g():
            with torch.no_grad():
                return f()

        return g

    prepared["gemm:torch"] = {"fwd": no_grad(lambda: torch.mm(x, w.t()))}
    if fused_ok and "fused-gemm" in args.modes:
        from neox_l2e.kernels.l2e_mlp import default_config
        from neox_l2e.kernels.l2e_mlp.ops import _recompute_preact

        cfg = default_config()
        prepared["gemm:triton"] = {"fwd": no_grad(lambda: _recompute_preact(x, w, None, "fused-gemm", cfg))}

    # then time them side by side: args.rounds rounds, each timing every variant once; median over rounds
    samples = {}
    for _ in range(args.rounds):
        for vname, fns in prepared.items():
            for pas, f in fns.items():
                samples.setdefault(vname, {}).setdefault(pas, []).append(timer(f, args, grad_to_none=leaves))
    for vname, by_pass in samples.items():
        results[vname] = {pas: statistics.median(v) for pas, v in by_pass.items()}
    prepared.clear()
    for t in leaves:
        t.grad = None
    if CUDA:
        torch.cuda.empty_cache()

    for vname, r in results.items():
        for pas in ("fwd", "bwd"):
            if "error" in r:
                if pas == "fwd":
                    rows.append(dict(shape=name, h=h, N=N, T=T, pass_=pas, variant=vname, ms=None, note=r["error"]))
                continue
            if pas not in r:
                continue
            ms = r[pas]
            floor = results.get("floor", {}).get(pas)
            torch_ms = results.get("torch-l2e", {}).get(pas)
            rows.append(
                dict(
                    shape=name,
                    h=h,
                    N=N,
                    T=T,
                    pass_=pas,
                    variant=vname,
                    ms=ms,
                    tflops=flops[pas] / ms / 1e9,
                    gbs=nbytes[pas] / ms / 1e6,
                    x_floor=ms / floor if floor and not vname.startswith("gemm") else None,
                    vs_torch=torch_ms / ms if torch_ms and not vname.startswith("gemm") else None,
                    note="",
                )
            )
    ct, tt = results.get("gemm:torch", {}).get("fwd"), results.get("gemm:triton", {}).get("fwd")
    if ct and tt:
        for r in rows:
            if r["shape"] == name and r["variant"] == "gemm:triton":
                verdict = "slower" if tt > ct else "not slower"
                r["note"] = f"Triton GEMM {verdict} than {'cuBLAS' if CUDA else 'torch.mm'} ({tt / ct:.2f}x)"


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def environment(args) -> str:
    if CUDA:
        device = torch.cuda.get_device_name()
        timer_name = "triton.testing.do_bench (median per round)"
    else:
        device = f"CPU ({torch.get_num_threads()} threads)"
        timer_name = f"time.perf_counter (median of >= {args.cpu_min_runs} runs per round)"
    return device, timer_name


def run(args) -> list:
    """Benchmark every requested shape; return the rows (dicts with the CSV_COLUMNS keys, 'pass_' for 'pass')."""
    dtype = DTYPES[args.dtype]
    if args.shapes is None:
        shape_names = DEFAULT_SHAPES if CUDA else ["70m"]
    else:
        shape_names = [s.strip() for s in args.shapes.split(",") if s.strip()]
    T = args.tokens if args.tokens is not None else (8 * 2048 if CUDA else 256)
    device, timer_name = environment(args)
    if not CUDA and not args.interpret_fused:
        print("note: no CUDA; fused variants skipped (--interpret-fused runs them in Triton's interpreter)")
    print(
        f"device: {device}; torch {torch.__version__}; dtype {args.dtype}; GELU approximate={args.approximate}; "
        f"T={T}; timer: {timer_name}; {args.rounds} rounds, variants alternating, median of rounds"
    )
    rows = []
    for s in shape_names:
        h = SHAPES[s] if s in SHAPES else int(s)
        bench_shape(s, h, T, dtype, rows, args)
    return rows


def print_table(rows) -> None:
    head = ["shape", "h", "N", "T", "pass", "variant", "ms", "TFLOP/s", "GB/s", "x_floor", "vs_torch", "note"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for r in rows:
        cells = [
            r["shape"],
            r["h"],
            r["N"],
            r["T"],
            r["pass_"],
            r["variant"],
            fmt(r["ms"], ".3f"),
            fmt(r.get("tflops"), ".2f"),
            fmt(r.get("gbs"), ".1f"),
            fmt(r.get("x_floor"), ".3f"),
            fmt(r.get("vs_torch"), ".2f"),
            r["note"],
        ]
        print("| " + " | ".join(str(c) for c in cells) + " |")


def goal_lines(rows, modes=("split", "fused-gemm")) -> list:
    """The kernel goals per shape and forward pass: <= 1.05x the floor, >= 1.5x faster than torch-l2e."""
    out = []
    for s in dict.fromkeys(r["shape"] for r in rows):
        by = {(r["variant"], r["pass_"]): r for r in rows if r["shape"] == s and r["ms"] is not None}
        for mode in modes:
            r = by.get((f"fused:{mode}", "fwd"))
            if r and r.get("x_floor") and r.get("vs_torch"):
                ok = r["x_floor"] <= 1.05 and r["vs_torch"] >= 1.5
                out.append(
                    f"goal {s} fused:{mode} fwd: {r['x_floor']:.3f}x floor (<= 1.05), "
                    f"{r['vs_torch']:.2f}x faster than torch-l2e (>= 1.5): {'MET' if ok else 'NOT MET'}"
                )
    return out


def write_csv(path, rows, device, dtype_name, approximate) -> None:
    import csv

    with open(path, "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["device", "dtype", "approximate"] + CSV_COLUMNS)
        for r in rows:
            vals = [r.get("pass_") if c == "pass" else r.get(c) for c in CSV_COLUMNS]
            vals = [f"{v:.6g}" if isinstance(v, float) else v for v in vals]
            wr.writerow([device, dtype_name, approximate] + vals)


# aten ops that launch no device work: allocations, views, autograd bookkeeping
NO_LAUNCH_OPS = {
    "empty",
    "empty_like",
    "empty_strided",
    "detach",
    "alias",
    "t",
    "transpose",
    "permute",
    "view",
    "_unsafe_view",
    "reshape",
    "as_strided",
    "expand",
    "slice",
    "select",
    "unsqueeze",
    "squeeze",
}


def count_launches(fn):
    """(Triton launches, torch ops that launch device work, allocations) of one ``fn()`` on meta tensors."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from neox_l2e.kernels.l2e_mlp import ops

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with ops.record_launches() as launches, Count() as c:
        fn()
    torch_ops = [n for n in c.names if n not in NO_LAUNCH_OPS]
    return [ln.kernel for ln in launches], torch_ops, sum(n.startswith("empty") for n in c.names)


def host_calls(args, dev):
    """The timed callables at the --host shape on ``dev``: {(variant, pass): fn}."""
    from neox_l2e.kernels.l2e_mlp import GPU_CONFIG, fused_up_gelu_l2e

    dtype = DTYPES[args.dtype]
    s = (args.shapes or "70m").split(",")[0]
    h = SHAPES[s] if s in SHAPES else int(s)
    T, N = (args.tokens or 128), 4 * h
    if dev == "cpu":  # tiny real tensors (see the module docstring)
        T, h, N = 8, 16, 64

    def t(*shape, dt=dtype, grad=False):
        if dev == "meta":
            out = torch.empty(shape, dtype=dt, device=dev)
        else:
            out = torch.randn(shape, dtype=torch.float32, device=dev).mul_(0.1).to(dt)
        return out.requires_grad_(grad)

    x, w, b = t(T, h, grad=True), t(N, h, grad=True), t(N, grad=True)
    mean, inv_var, gz = t(N, dt=torch.float32), t(N, dt=torch.float32).abs_(), t(T, N)
    gl = torch.ones((), device=dev)
    cfg = GPU_CONFIG  # the compiled path's host code, also on CPU

    def fused(mode):
        return lambda: fused_up_gelu_l2e(x, w, b, mean, inv_var, 9.0, 1e-6, args.approximate, mode, config=cfg)

    calls = {}
    for mode in [m for m in args.modes.split(",") if m]:
        f = fused(mode)
        calls[(f"fused:{mode}", "fwd")] = f
        calls[(f"fused:{mode}", "fwd+bwd")] = lambda f=f: torch.autograd.grad(list(f()[:2]), [x, w, b], [gz, gl])
    floor = lambda: floor_path(x, w, b, args.approximate)  # noqa: E731
    calls[("floor", "fwd")] = floor
    calls[("floor", "fwd+bwd")] = lambda: torch.autograd.grad([floor()], [x, w, b], [gz])
    return calls, (s, h, N, T)


def run_host(args) -> list:
    """Host microseconds per call (see the module docstring); one row per (variant, pass)."""
    from neox_l2e.kernels.l2e_mlp import ops

    n = max(1, args.host_calls)
    counted, _ = host_calls(args, "meta")
    counts = {k: count_launches(f) for k, f in counted.items()}
    calls, (s, h, N, T) = host_calls(args, "cuda" if CUDA else "cpu")
    if CUDA:
        where = f"CUDA wall per call, back-to-back, one sync (includes Triton's launcher); T={T} h={h} N={N}"
    else:
        where = (
            "CPU host code, Triton launches recorded not run (excludes Triton's launcher), tiny CPU tensors "
            f"T={T} h={h} N={N} (launch counts at the requested shape)"
        )
    print(f"host cost per call: {where}; dtype {args.dtype}; {n} calls x {args.rounds} rounds")
    rows = []
    for key, f in calls.items():
        samples = []
        for _ in range(args.rounds):
            with ops.record_launches() if not CUDA else contextlib.nullcontext():
                for _ in range(min(10, n)):  # warm-up (CUDA: compiles the kernels once)
                    f()
                if CUDA:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(n):
                    f()
                if CUDA:
                    torch.cuda.synchronize()
                samples.append((time.perf_counter() - t0) / n * 1e6)
        triton_l, torch_ops, allocs = counts[key]
        rows.append(
            dict(
                shape=s,
                h=h,
                N=N,
                T=T,
                variant=key[0],
                pass_=key[1],
                us=statistics.median(samples),
                triton=len(triton_l),
                torch_ops=len(torch_ops),
                allocs=allocs,
                note=" ".join(k.strip("_").replace("_kernel", "") for k in triton_l) + " ; " + " ".join(torch_ops),
            )
        )
    print(
        "| variant | pass | us/call | Triton launches | torch ops with device work | allocations"
        " | launched (Triton ; torch) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['pass_']} | {r['us']:.1f} | {r['triton']} | {r['torch_ops']} | {r['allocs']} "
            f"| {r['note']} |"
        )
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.host:
        run_host(args)
        return 0
    rows = run(args)
    print_table(rows)
    if CUDA:  # the goals, forward pass
        for line in goal_lines(rows, [m for m in args.modes.split(",") if m]):
            print(line)
    if args.csv:
        write_csv(args.csv, rows, environment(args)[0], args.dtype, args.approximate)
        print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
