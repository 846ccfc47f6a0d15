#!/usr/bin/env python
"""One command for the first GPU: validate and benchmark the fused L2E MLP kernel on one H100/H200.

    python tools/gpu_check.py [--out gpu_check_out] [--budget-s 450] [--shapes 70m,410m,2.8b,6.9b,12b]

Steps, each a subprocess with its own timeout, all inside one wall-time budget (default 450 s, so the whole
command stays under 8 minutes with start-up), every result written as soon as it exists (a step that times
out or fails leaves the earlier ones' files and is marked in the summary):
  1. env    CUDA / torch / Triton versions, the device, and one compiled launch of the kernel in both modes
            checked against the torch reference (counts and z);
  2. tests  the GPU-marked correctness tests of tests/kernels, compiled (production launch configuration,
            bf16/fp16/fp32, both modes, both GELUs, bias / no bias, save / recompute, ragged shapes, T = 1,
            determinism, forward/backward selection agreement, l2e_grad_to_input, autocast);
  3. bench  tools/bench_kernels.py once per shape (T = 16384; 70M, 410M, 2.8B, 6.9B, 12B MLP shapes): floor
            (cuBLAS GEMM + bias + GELU), fused split / fused-gemm (saved and recomputed pre-activation), the
            unfused torch path, the bare GEMMs; forward and backward;
  4. report one CSV and one markdown table of every timed row, and the goal lines.
Outputs in --out: env.log, tests.log, tests.xml, bench_<shape>.csv/.log, gpu_check.csv, gpu_check.md,
summary.json. The whole-model step overhead is not measured here (tools/bench_step.py does that).

Without a CUDA device it prints one line saying so and exits 0 (the CPU checks are the test suite and the
ahead-of-time compile: python -m neox_l2e.kernels.l2e_mlp.aot_check).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ["70m", "410m", "2.8b", "6.9b", "12b"]
# per-step ceilings (seconds); each is also cut to what is left of the budget
STEP_TIMEOUT = {
    "env": 90,
    "tests": 210,
    "bench:70m": 40,
    "bench:410m": 40,
    "bench:2.8b": 50,
    "bench:6.9b": 60,
    "bench:12b": 70,
}

ENV_SNIPPET = r"""
import math, torch, triton
from neox_l2e.kernels.l2e_mlp import fused_up_gelu_l2e, l2e_mlp_reference, interpreter_enabled
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability(),
      "memory GiB", round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
assert not interpreter_enabled(), "TRITON_INTERPRET is set: unset it on a GPU machine"
g = torch.Generator().manual_seed(0)
x = torch.randn(256, 128, generator=g).cuda().bfloat16()
w = (torch.randn(512, 128, generator=g) / math.sqrt(128)).cuda().bfloat16()
b = (0.1 * torch.randn(512, generator=g)).cuda().bfloat16()
mean = torch.zeros(512, device="cuda"); inv_var = torch.ones(512, device="cuda")
rz, _, rn, _ = l2e_mlp_reference(x, w, b, mean, inv_var, 1.0, 1e-6, round_preact=True)
for mode in ("split", "fused-gemm"):
    z, loss, n, _ = fused_up_gelu_l2e(x, w, b, mean, inv_var, 1.0, 1e-6, mode=mode)
    torch.cuda.synchronize()
    dz = (z.float() - rz.float()).abs().max().item()
    print(f"{mode}: n_sel {int(n)} (reference {int(rn)}), max |z - reference| {dz:.3g}")
    assert abs(int(n) - int(rn)) <= 2 and dz < 0.05
print("env ok")
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="gpu_check_out", help="output folder (created)")
    p.add_argument("--budget-s", type=float, default=450.0, help="wall-time budget of all steps together")
    p.add_argument("--shapes", default=",".join(SHAPES), help="bench shapes, in order (70m,410m,2.8b,6.9b,12b)")
    p.add_argument("--tokens", type=int, default=16384, help="token rows T of the bench")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--skip-tests", action="store_true", help="skip step 2 (the compiled correctness tests)")
    return p.parse_args(argv)


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "tools" / "bench_kernels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class Runner:
    """Runs the steps in order within the budget; records each step's status in summary.json at once."""

    def __init__(self, out: Path, budget_s: float):
        self.out, self.t0, self.budget = out, time.monotonic(), budget_s
        self.summary = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "budget_s": budget_s, "steps": {}}
        self.env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled kernels
        self.env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def step(self, name: str, cmd: list, log: str) -> bool:
        timeout = min(STEP_TIMEOUT.get(name, 60), self.left())
        if timeout < 10:
            self._record(name, "skipped (budget spent)", 0.0)
            print(f"[gpu_check] {name}: skipped, budget spent", flush=True)
            return False
        print(f"[gpu_check] {name}: running (timeout {timeout:.0f} s)", flush=True)
        t = time.monotonic()
        with open(self.out / log, "w") as f:
            try:
                rc = subprocess.run(
                    cmd, cwd=ROOT, env=self.env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout
                ).returncode
                status = "ok" if rc == 0 else f"failed (exit {rc})"
            except subprocess.TimeoutExpired:
                status = f"timed out after {timeout:.0f} s"
        dt = time.monotonic() - t
        self._record(name, status, dt)
        tail = (self.out / log).read_text(errors="replace").strip().splitlines()[-1:] or [""]
        print(f"[gpu_check] {name}: {status} in {dt:.0f} s; {tail[0][:160]}", flush=True)
        return status == "ok"

    def _record(self, name, status, dt):
        self.summary["steps"][name] = {"status": status, "seconds": round(dt, 1)}
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=1))


def _read_rows(paths) -> list:
    rows = []
    for p in paths:
        if not p.exists():
            continue
        with open(p) as f:
            for r in csv.DictReader(f):
                for k in ("ms", "tflops", "gbs", "x_floor", "vs_torch"):
                    r[k] = float(r[k]) if r.get(k) not in (None, "") else None
                r["pass_"] = r["pass"]
                rows.append(r)
    return rows


def report(out: Path, rows: list, bench) -> list:
    """gpu_check.csv, gpu_check.md; returns the goal lines (forward and backward x_floor, speed-up)."""
    if not rows:
        return ["goal: no benchmark rows (see bench_*.log)"]
    cols = ["device", "dtype", "approximate"] + bench.CSV_COLUMNS
    with open(out / "gpu_check.csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(cols)
        for r in rows:
            wr.writerow(
                [
                    "" if r.get(c if c != "pass" else "pass_") is None else r.get(c if c != "pass" else "pass_")
                    for c in cols
                ]
            )
    lines = [
        "| shape | pass | variant | ms | TFLOP/s | x_floor | vs_torch | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            "| "
            + " | ".join(
                [
                    r["shape"],
                    r["pass_"],
                    r["variant"],
                    bench.fmt(r["ms"], ".3f"),
                    bench.fmt(r["tflops"], ".1f"),
                    bench.fmt(r["x_floor"], ".3f"),
                    bench.fmt(r["vs_torch"], ".2f"),
                    r.get("note", ""),
                ]
            )
            + " |"
        )
    goals = bench.goal_lines(rows)
    by = {(r["shape"], r["variant"], r["pass_"]): r for r in rows if r["ms"] is not None}
    for shape in dict.fromkeys(r["shape"] for r in rows):
        r = by.get((shape, "fused:split", "bwd"))
        if r and r["x_floor"]:
            goals.append(
                f"info {shape} fused:split bwd: {r['x_floor']:.3f}x floor backward, "
                f"{r['vs_torch'] or float('nan'):.2f}x faster than torch-l2e backward"
            )
    r = by.get(("6.9b", "fused:split", "fwd"))
    if r and r["vs_torch"]:
        goals.append(
            f"goal 6.9b fused:split fwd >= 3x faster than torch-l2e (estimate in docs/kernels.md): "
            f"{r['vs_torch']:.2f}x: {'MET' if r['vs_torch'] >= 3 else 'NOT MET'}"
        )
    device = rows[0].get("device", "")
    (out / "gpu_check.md").write_text(
        f"device: {device}; dtype {rows[0].get('dtype')}; T = {rows[0].get('T')}\n\n"
        + "\n".join(lines)
        + "\n\n"
        + "\n".join(goals)
        + "\n"
    )
    return goals


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing to check or time on "
            "this machine (CPU checks: pytest tests/kernels; python -m neox_l2e.kernels.l2e_mlp.aot_check)"
        )
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = Runner(out, args.budget_s)
    py = sys.executable
    run.step("env", [py, "-c", ENV_SNIPPET], "env.log")
    if not args.skip_tests:
        run.step(
            "tests",
            [
                py,
                "-m",
                "pytest",
                "-q",
                "-m",
                "gpu",
                "tests/kernels",
                "-p",
                "no:cacheprovider",
                f"--junitxml={out / 'tests.xml'}",
            ],
            "tests.log",
        )
    csvs = []
    for shape in [s for s in args.shapes.split(",") if s]:
        path = out / f"bench_{shape}.csv"
        csvs.append(path)
        run.step(
            f"bench:{shape}",
            [
                py,
                "tools/bench_kernels.py",
                "--shapes",
                shape,
                "--tokens",
                str(args.tokens),
                "--dtype",
                args.dtype,
                "--rounds",
                "2",
                "--no-compile",
                "--preact",
                "both",
                "--warmup",
                "10",
                "--rep",
                "40",
                "--csv",
                str(path),
            ],
            f"bench_{shape}.log",
        )
    bench = _bench_module()
    for line in report(out, _read_rows(csvs), bench):
        print(line)
    steps = run.summary["steps"]
    print(
        f"[gpu_check] {sum(s['status'] == 'ok' for s in steps.values())}/{len(steps)} steps ok in "
        f"{run.budget - run.left():.0f} s; results in {out}/ (gpu_check.md, gpu_check.csv, summary.json)"
    )
    return 0 if all(s["status"] == "ok" for s in steps.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
