#!/usr/bin/env python
"""The paper's experiment grid in one command: baseline, L2E p in {1, 2, 3}% x {mid2, mid-third, top-bot} and
MEmeL p in {1, 2, 3}% (mid2) on one config, for several seeds; then FKR and the local eval tasks on every run's
final checkpoint; then one report.

    python tools/l2e_grid.py --seeds 1,2,3 --out runs/grid --jobs 2        # the demo config, default corpus
    python tools/l2e_grid.py --grid small --seeds 1,2 train-iters=100      # baseline, l2e-2pct-mid2, memel-2pct-mid2
    python tools/l2e_grid.py --only 'baseline,l2e-*-mid2' --seeds 1,2,3    # names or shell-style patterns
    python tools/l2e_grid.py --config my-model.yml my-data.yml --no-corpus --seeds 1,2,3 --out runs/grid-70m
    python tools/l2e_grid.py --report-only --out runs/grid                 # rebuild the report from what is there

Phase 1, training: every run trains in its own process (train.py) into OUT/<name>/seed<s>/ (metrics.jsonl,
train.log) and leaves a done.json when it finishes; --jobs N runs N at once, each with max(1, CPUs // N) CPU
threads (OMP_NUM_THREADS), its output in its own train.log; the terminal gets one line per start and per finish,
with the elapsed time and an ETA (from the runs finished so far, shared by the N slots). Ctrl-C (or SIGTERM)
stops every training process (their process groups; on Linux they also die with the grid process).
Each run keeps only its final checkpoint, in OUT/<name>/seed<s>/checkpoints (weights and Adam state: about 12
bytes per parameter: 34 MB per run on the demo config, measured, so 1.3 GB for its 13 entries x 3 seeds);
--no-checkpoints keeps none (the grid as it was before FKR and eval) and then skips phase 2.

Phase 2, on each finished run's checkpoint: FKR (per-token tau_k, every layer, k = the config's l2e-fkr-k or
--fkr-k; neox_l2e.analysis.scan with the formulas of neox_l2e.l2e.fkr, as tools/fkr.py) on a labelled jsonl
(--fkr-data; by default data/labelled/code_en.jsonl, built as tools/build_labelled_dataset.py does when absent),
at most --fkr-tokens-per-label tokens per label; and the local eval tasks (--eval-tasks, default
tiny_shakespeare, made from the default corpus when absent, as tools/evaluate.py does) with lm-eval, offline,
through neox_l2e.analysis.evaluation and the project's adapter. Results: fkr.json and eval.json per run.

Resume: a run whose done.json records the same settings (config files and overrides; where the checkpoint goes is
not one of them) is not trained again; a run that failed or was interrupted starts again. A finished run without
a checkpoint (made by the grid before checkpoints were kept, or deleted) is trained again only when phase 2
still lacks its results; with --no-checkpoints it is kept as it is. fkr.json / eval.json are kept when they
record the same settings (data file and its hash, k, token cap; tasks, shots, limit, task files' hashes; the
precision: bf16 on a GPU, fp32 on the CPU).

The report (OUT/report.md, report.json, and the figures phi_distribution.png, heldout_over_training.png,
fkr.png) gives, per grid entry, mean and spread (sample standard deviation) over the seeds of: the last
validation loss and its change against the baseline of the same seed; the mean training step time and its
overhead against the baseline of the same seed (the first logged window, with the warm-up step, is left out;
on a shared machine, and with --jobs > 1, this is noisy); held-out monosemanticity (ms_heldout/...,
neox_l2e.l2e.heldout: phi of Eq. 1 on a fixed held-out set with statistics fresh on it) of the entry's
inhibited layers next to the baseline's on the same layers, and per layer; the eval tasks' acc and acc_norm
(with lm-eval's stderr); FKR per k on the inhibited layers next to the baseline's, the chance FKR, and per
layer. The figures: the held-out phi distribution per layer (exceedance P(phi > x), seeds pooled) at the last
evaluation, baseline against every entry; held-out phi > 5 over training per layer; FKR against k per layer
(mean and sd over seeds), baseline against every entry, with the chance FKR dashed.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]

PCTS = (1, 2, 3)
LAYER_SETS = ("mid2", "mid-third", "top-bot")
SMALL = ("baseline", "l2e-2pct-mid2", "memel-2pct-mid2")


class GridError(ValueError):
    """A user error of this tool (one line)."""


def grid_entries() -> Dict[str, dict]:
    """name -> config overrides of every entry of the paper's grid, in report order."""
    out = {"baseline": {"l2e_enabled": False}}
    for p in PCTS:
        for layers in LAYER_SETS:
            out[f"l2e-{p}pct-{layers}"] = {
                "l2e_enabled": True,
                "l2e_method": "l2e",
                "l2e_layers": layers,
                "l2e_ratio": p / 100.0,
            }
    for p in PCTS:
        out[f"memel-{p}pct-mid2"] = {
            "l2e_enabled": True,
            "l2e_method": "memel",
            "l2e_layers": "mid2",
            "l2e_ratio": p / 100.0,
        }
    return out


def select_entries(grid: str, only: Optional[str]) -> Dict[str, dict]:
    """The entries of --grid (full / small), narrowed by --only (comma-separated names or patterns)."""
    entries = grid_entries()
    if grid == "small":
        entries = {k: v for k, v in entries.items() if k in SMALL}
    elif grid != "full":
        raise GridError(f"--grid {grid!r}: use full or small")
    if only:
        pats = [p.strip() for p in only.split(",") if p.strip()]
        for p in pats:
            if not any(fnmatch.fnmatchcase(k, p) for k in entries):
                raise GridError(f"--only {p!r} matches no grid entry (entries: {', '.join(entries)})")
        entries = {k: v for k, v in entries.items() if any(fnmatch.fnmatchcase(k, p) for p in pats)}
    return entries


def fmt_time(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}"


# ------------------------------------------------------------------------------------------------
# running: training (phase 1)

CKPT_DIR = "checkpoints"
CKPT_MB_PER_RUN_DEMO = 34  # configs/local/demo.yml, measured: 34.4 MB (2.86 M parameters: fp32 weights + Adam state)


def run_settings(configs: Sequence[str], overrides: Dict[str, object], entry: dict, seed: int) -> dict:
    """What done.json records and resume compares: the config files and every override of the run. Where the
    checkpoint goes is not part of it (it does not change what is trained)."""
    return json.loads(
        json.dumps({"configs": [str(c) for c in configs], "overrides": {**overrides, **entry, "seed": seed}})
    )


def has_checkpoint(d: Path) -> bool:
    return (d / CKPT_DIR / "latest").is_file()


def train_command(configs: Sequence[str], overrides: Dict[str, object], d: Path, keep_checkpoint: bool) -> List[str]:
    """train.py's command line for one run: logs into d; with keep_checkpoint only the final checkpoint is saved
    (into d/checkpoints: no periodic saves, keep the last one, no save on Ctrl-C)."""
    from l2e_sweep import _arg

    args = dict(overrides, log_dir=str(d), save=None)
    if keep_checkpoint:
        args.update(
            save=str(d / CKPT_DIR),
            checkpoint_factor=None,
            extra_save_iters=None,
            keep_last_n_checkpoints=1,
            save_on_interrupt=False,
        )
    return [sys.executable, str(ROOT / "train.py"), *configs, *(_arg(k, v) for k, v in args.items())]


def _parent_death_signal():
    """Linux: a function for the child (between fork and exec) that makes it get SIGTERM when the grid process
    dies, even by SIGKILL (no orphaned training); None elsewhere. prctl is looked up here, in the parent, so
    the child only calls it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def set_pdeathsig():  # pragma: no cover - runs in the child
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    return set_pdeathsig


def _start(cmd: List[str], log_path: Path, threads: int) -> subprocess.Popen:
    """One training process in its own process group (so the grid can stop it and what it started), output to
    log_path, with `threads` CPU threads."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[k] = str(threads)
    with open(log_path, "w") as log:
        return subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            env=env,
            start_new_session=True,
            preexec_fn=_parent_death_signal(),
        )


def stop_processes(procs: Sequence[subprocess.Popen], grace_s: float = 15.0) -> None:
    """SIGTERM to each process group, SIGKILL to those still there after grace_s; waits for all."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
    deadline = time.time() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            p.wait()


def _eta(mean_t: float, queued: int, running_elapsed: Sequence[float], jobs: int) -> float:
    """Seconds left: the queued runs' mean time and the running ones' remainder, shared by `jobs` slots."""
    if not math.isfinite(mean_t):
        return float("nan")
    work = queued * mean_t + sum(max(0.0, mean_t - e) for e in running_elapsed)
    return work / max(1, jobs)


class _SigtermAsInterrupt:
    """SIGTERM raises KeyboardInterrupt in the main thread while active (so the children are stopped too)."""

    def __enter__(self):
        self.old = None
        try:
            self.old = signal.signal(signal.SIGTERM, self._raise)
        except ValueError:  # not the main thread
            pass
        return self

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)
        return False


def run_grid(
    configs: Sequence[str],
    entries: Dict[str, dict],
    seeds: Sequence[int],
    out: Path,
    overrides: Dict[str, object],
    log=print,
    jobs: int = 1,
    keep_checkpoints: bool = True,
    needs_checkpoint=None,
    train_configs: Optional[Sequence[str]] = None,
) -> List[dict]:
    """Train every (entry, seed) not finished yet, `jobs` at a time; returns [{name, seed, dir, status, time_s}]
    in grid order. A finished run (done.json with the same settings) is skipped, unless keep_checkpoints is on,
    the run has no checkpoint (an older grid, or a deleted one) and needs_checkpoint(name, seed, dir) says its
    results still need one: then it is trained again. A failed run stops the grid (RuntimeError) after the runs
    still going have finished; Ctrl-C / SIGTERM stops every child."""
    jobs = max(1, int(jobs))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    plan = [(name, seed) for name in entries for seed in seeds]
    done_times: List[float] = []
    records = []
    todo = []
    retrain = []
    for name, seed in plan:
        d = out / name / f"seed{seed}"
        settings = run_settings(configs, overrides, entries[name], seed)
        marker = d / "done.json"
        if marker.is_file():
            try:
                prev = json.loads(marker.read_text())
            except (OSError, json.JSONDecodeError):
                prev = {}
            if prev.get("settings") == settings:
                if keep_checkpoints and not has_checkpoint(d) and needs_checkpoint and needs_checkpoint(name, seed, d):
                    retrain.append(f"{name}/seed{seed}")
                else:
                    records.append(
                        {"name": name, "seed": seed, "dir": str(d), "status": "skipped", "time_s": prev.get("time_s")}
                    )
                    if prev.get("time_s"):
                        done_times.append(float(prev["time_s"]))
                    continue
        todo.append((name, seed, d, settings))
    skipped = len(plan) - len(todo)
    log(
        f"grid: {len(entries)} entries x {len(seeds)} seeds = {len(plan)} runs; {skipped} finished already "
        f"(skipped), {len(todo)} to run, into {out}"
        + (f"; {jobs} at a time, {threads} CPU thread(s) each" if todo else "")
    )
    if retrain:
        log(f"grid: finished but without the checkpoint FKR / eval need, trained again: {', '.join(retrain)}")
    t_start = time.time()
    queue = list(todo)
    running: Dict[subprocess.Popen, tuple] = {}
    failed: List[str] = []
    started = finished = 0

    def eta():
        mean_t = sum(done_times) / len(done_times) if done_times else float("nan")
        now = time.time()
        return fmt_time(_eta(mean_t, len(queue), [now - v[4] for v in running.values()], jobs))

    with _SigtermAsInterrupt():
        try:
            while queue or running:
                while queue and len(running) < jobs and not failed:
                    name, seed, d, settings = queue.pop(0)
                    if d.exists():
                        shutil.rmtree(d)  # an unfinished or differently-configured run starts over
                    d.mkdir(parents=True)
                    cmd = train_command(train_configs or configs, settings["overrides"], d, keep_checkpoints)
                    proc = _start(cmd, d / "train.log", threads)
                    running[proc] = (name, seed, d, settings, time.time())  # at once: an interrupt stops it
                    (d / "train.pid").write_text(f"{proc.pid}\n")
                    started += 1
                    log(
                        f"[started {skipped + started}/{len(plan)}] {name} seed {seed} ({len(running)} running; "
                        f"elapsed {fmt_time(time.time() - t_start)}, ETA {eta()})"
                    )
                if failed and not running:
                    break
                if failed:
                    queue.clear()
                time.sleep(0.2)
                for proc in [p for p in running if p.poll() is not None]:
                    name, seed, d, settings, t0 = running.pop(proc)
                    dt = time.time() - t0
                    (d / "train.pid").unlink(missing_ok=True)
                    if proc.returncode != 0:
                        tail = (d / "train.log").read_text(errors="replace").strip().splitlines()[-1:]
                        failed.append(
                            f"{d}: training failed (exit {proc.returncode}): {tail[0] if tail else ''} "
                            f"(whole log: {d / 'train.log'})"
                        )
                        log(f"    FAILED {name} seed {seed}: {failed[-1]}")
                        continue
                    done_times.append(dt)
                    finished += 1
                    (d / "done.json").write_text(
                        json.dumps(
                            {
                                "settings": settings,
                                "time_s": dt,
                                "checkpoint": has_checkpoint(d),
                                "jobs": jobs,
                                "threads": threads,
                                "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                            },
                            indent=2,
                        )
                    )
                    records.append({"name": name, "seed": seed, "dir": str(d), "status": "ran", "time_s": dt})
                    log(
                        f"[done {skipped + finished}/{len(plan)}] {name} seed {seed} in {dt:.0f} s "
                        f"(elapsed {fmt_time(time.time() - t_start)}, ETA {eta()})"
                    )
        except BaseException:
            stop_processes(list(running))
            raise
    if failed:
        raise RuntimeError(failed[0] + (f" (and {len(failed) - 1} more failed)" if len(failed) > 1 else ""))
    order = {(n, s): i for i, (n, s) in enumerate(plan)}
    return sorted(records, key=lambda r: order[(r["name"], r["seed"])])


# ------------------------------------------------------------------------------------------------
# after training (phase 2): FKR and the local eval tasks on each run's checkpoint

FKR_FILE = "fkr.json"
EVAL_FILE = "eval.json"  # tools/evaluate.py's format ({"runs": [...]}), so neox_l2e.analysis.runs reads it too
DEFAULT_FKR_DATA = ROOT / "data/labelled/code_en.jsonl"
DEFAULT_EVAL_DIR = ROOT / "data/eval"


@dataclass
class PostOptions:
    """What phase 2 computes; fkr_data None / eval_tasks [] switch a part off."""

    fkr_data: Optional[Path] = None
    fkr_ks: Sequence[float] = ()
    fkr_tokens_per_label: int = 4000
    fkr_seq_len: int = 256
    eval_tasks: Sequence[str] = ()
    eval_limit: Optional[float] = None
    eval_shots: int = 0
    eval_data_dir: Path = DEFAULT_EVAL_DIR
    batch_size: int = 8
    fkr_settings: dict = field(default_factory=dict)  # filled by prepare_post
    eval_settings: dict = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.fkr_data is not None or bool(self.eval_tasks)


def _post_device_dtype():
    """Where phase 2 runs the models: the GPU in bf16 when there is one, else the CPU in fp32 (as the analysis
    tools' defaults)."""
    import torch

    from neox_l2e.analysis.common import pick_device

    device = pick_device("auto")
    return device, (torch.bfloat16 if device.type == "cuda" else torch.float32)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def prepare_post(opts: PostOptions, log=print) -> PostOptions:
    """Make the inputs phase 2 needs (the default labelled jsonl, the tiny_shakespeare set) when they are absent,
    check the others, and fill in the settings that the per-run result files record and resume compares (with
    the precision the model runs in: results on a GPU, in bf16, are not mixed with results on the CPU, in fp32)."""
    dtype = _post_device_dtype()[1]
    if opts.fkr_data is not None:
        p = Path(opts.fkr_data)
        if not p.is_file():
            if p.resolve() != DEFAULT_FKR_DATA.resolve():
                raise GridError(f"--fkr-data {p}: not found")
            from neox_l2e.analysis.labelled import build_code_and_english, write_jsonl

            recs = build_code_and_english(docs_per_label=200, chars_per_doc=1200, seed=0)
            write_jsonl(recs, p)
            log(
                f"fkr: built {p} ({len(recs)} texts, labels {', '.join(sorted({r['label'] for r in recs}))}; "
                "as tools/build_labelled_dataset.py does with its defaults)"
            )
        if opts.fkr_tokens_per_label < 2 or opts.fkr_seq_len < 2:
            raise GridError("--fkr-tokens-per-label and the FKR window must be at least 2 tokens")
        opts.fkr_settings = {
            "data": str(p.resolve()),
            "data_sha256": _sha256(p),
            "k_percent": [float(k) for k in opts.fkr_ks],
            "mode": "per-token",
            "tokens_per_label": int(opts.fkr_tokens_per_label),
            "max_window": int(opts.fkr_seq_len),
            "dtype": str(dtype).replace("torch.", ""),
        }
    if opts.eval_tasks:
        from neox_l2e.analysis.evaluation import build_tiny_shakespeare, resolve_tasks

        tasks = resolve_tasks(",".join(opts.eval_tasks))
        opts.eval_tasks = tasks
        files = {}
        for t in tasks:
            f = Path(opts.eval_data_dir) / f"{t}.jsonl"
            if not f.is_file() and t == "tiny_shakespeare":
                build_tiny_shakespeare(f, n=60, seed=0)
                log(
                    f"eval: built {f} (60 examples from the default corpus's held-out plays, as tools/evaluate.py does)"
                )
            if not f.is_file():
                raise GridError(
                    f"eval task {t}: {f} not found (tools/prepare_eval_data.py makes it; or --eval-data-dir, "
                    "--eval-tasks)"
                )
            files[t] = _sha256(f)
            shots = f.with_name(f.stem + ".fewshot.jsonl")
            if shots.is_file():
                files[t + ".fewshot"] = _sha256(shots)
        opts.eval_settings = {
            "tasks": list(tasks),
            "shots": int(opts.eval_shots),
            "limit": opts.eval_limit,
            "data_dir": str(Path(opts.eval_data_dir).resolve()),
            "data_sha256": files,
            "dtype": str(dtype).replace("torch.", ""),
        }
    return opts


def _result_current(path: Path, settings: dict) -> bool:
    try:
        return json.loads(path.read_text()).get("settings") == json.loads(json.dumps(settings))
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def post_todo(d: Path, opts: PostOptions) -> List[str]:
    """The phase-2 parts ("fkr", "eval") run d still lacks (no result file, or one made with other settings)."""
    todo = []
    if opts.fkr_data is not None and not _result_current(d / FKR_FILE, opts.fkr_settings):
        todo.append("fkr")
    if opts.eval_tasks and not _result_current(d / EVAL_FILE, opts.eval_settings):
        todo.append("eval")
    return todo


def _write_json_atomic(obj, path: Path) -> None:
    from neox_l2e.analysis.report import write_json

    tmp = path.with_name(path.name + ".tmp")
    write_json(obj, tmp)
    os.replace(tmp, path)


def fkr_of_run(loaded, opts: PostOptions, records) -> dict:
    """FKR (per-token tau_k) of every layer of a loaded checkpoint on the labelled records: the scan of
    neox_l2e.analysis.scan (formulas: neox_l2e.l2e.fkr), K-S off, with the chance FKR of each layer."""
    from neox_l2e.analysis.cli import inhibited_layers
    from neox_l2e.analysis.labelled import tokenize_labelled
    from neox_l2e.analysis.scan import ScanOptions, scan_model

    seq = min(opts.fkr_seq_len, loaded.cfg.model.max_position_embeddings or opts.fkr_seq_len)
    data = tokenize_labelled(records, loaded.tokenizer, seq, opts.fkr_tokens_per_label)
    so = ScanOptions(
        batch_size=opts.batch_size,
        neuron_sample=1,
        ks_tokens=0,
        fkr_ks=[float(k) for k in opts.fkr_ks],
        fkr_modes=["per-token"],
        compute_ks=False,
        seed=0,
        progress=False,
    )
    res = scan_model(loaded.model, data, so, name=loaded.name, path=loaded.path)
    return {
        "labels": res.label_names,
        "tokens_per_label": res.tokens_per_label,
        "inhibited_layers": inhibited_layers(loaded.cfg),
        "layers": [
            {
                "layer": l.layer,
                "num_neurons": l.num_neurons,
                "fkr": {f"{k:g}": v for k, v in l.fkr["per-token"].items()},
                "kills": {f"{k:g}": v for k, v in l.kills["per-token"].items()},
                "chance": res.chance_fkr(l),
            }
            for l in res.layers
        ],
    }


def eval_of_run(loaded, opts: PostOptions, device, label: str) -> dict:
    """lm-eval (offline, local task yamls of configs/eval) on a loaded checkpoint through the project's adapter:
    neox_l2e.analysis.evaluation.evaluate, as tools/evaluate.py runs it."""
    from neox_l2e.analysis.evaluation import evaluate, truncation_warnings
    from neox_l2e.analysis.lm_adapter import NeoXL2ELM

    lm = NeoXL2ELM(loaded.model, loaded.tokenizer, batch_size=opts.batch_size)
    t0 = time.time()
    res = evaluate(
        lm,
        list(opts.eval_tasks),
        num_fewshot=opts.eval_shots,
        data_dir=opts.eval_data_dir,
        limit=opts.eval_limit,
        batch_size=opts.batch_size,
        device=str(device),
        seed=0,
    )
    res.pop("samples", None)
    res.update(model=label, checkpoint=loaded.path, backend="adapter", seconds=round(time.time() - t0, 2))
    res["warnings"] = truncation_warnings(res, label)
    return res


def post_process(records: Sequence[dict], opts: PostOptions, log=print) -> Dict[str, int]:
    """FKR and eval for every finished run that lacks them (resumable: a result file with the same settings is
    kept). Returns counts {"done", "skipped", "no_checkpoint"}."""
    from neox_l2e.analysis.common import offline_env
    from neox_l2e.analysis.loading import load_model

    offline_env()
    work, skipped, no_ckpt = [], 0, []
    for r in records:
        d = Path(r["dir"])
        todo = post_todo(d, opts)
        if not todo:
            skipped += 1
        elif not has_checkpoint(d):
            no_ckpt.append(f"{r['name']}/seed{r['seed']}")
        else:
            work.append((r, todo))
    parts = " and ".join(p for p, on in (("FKR", opts.fkr_data is not None), ("eval", bool(opts.eval_tasks))) if on)
    log(f"{parts}: {len(records)} finished runs; {skipped} up to date (skipped), {len(work)} to do")
    if no_ckpt:
        log(f"{parts}: no checkpoint, left out of those columns: {', '.join(no_ckpt)}")
    if not work:
        return {"done": 0, "skipped": skipped, "no_checkpoint": len(no_ckpt)}
    device, dtype = _post_device_dtype()
    records_cache = None
    t_start, times = time.time(), []
    for i, (r, todo) in enumerate(work):
        d = Path(r["dir"])
        t0 = time.time()
        loaded = load_model(d / CKPT_DIR, device=device, dtype=dtype, name=f"{r['name']}/seed{r['seed']}")
        msg = []
        if "fkr" in todo:
            if records_cache is None:
                from neox_l2e.analysis.labelled import read_labelled_jsonl

                records_cache = read_labelled_jsonl(opts.fkr_data)
            t1 = time.time()
            res = fkr_of_run(loaded, opts, records_cache)
            _write_json_atomic({"settings": opts.fkr_settings, "checkpoint": loaded.path, **res}, d / FKR_FILE)
            msg.append(f"FKR {time.time() - t1:.0f} s")
        if "eval" in todo:
            t1 = time.time()
            # lm-eval's progress bars and notes go to the run's eval.log, not the terminal
            with open(d / "eval.log", "w") as elog, contextlib.redirect_stderr(elog), contextlib.redirect_stdout(elog):
                res = eval_of_run(loaded, opts, device, f"{r['name']}/seed{r['seed']}")
            _write_json_atomic({"settings": opts.eval_settings, "runs": [res]}, d / EVAL_FILE)
            msg.append(f"eval {time.time() - t1:.0f} s")
            if res["warnings"]:
                msg.append(f"{len(res['warnings'])} eval warning(s): prompts cut to the context (eval.json)")
        del loaded
        times.append(time.time() - t0)
        left = (len(work) - i - 1) * sum(times) / len(times)
        log(
            f"[{parts} {i + 1}/{len(work)}] {r['name']} seed {r['seed']}: {', '.join(msg)} "
            f"(elapsed {fmt_time(time.time() - t_start)}, ETA {fmt_time(left)})"
        )
    return {"done": len(work), "skipped": skipped, "no_checkpoint": len(no_ckpt)}


# ------------------------------------------------------------------------------------------------
# reading and aggregating


def _step_time(metrics_file: Path) -> Optional[float]:
    """Mean of the logged windows' step_time_s, the first window (the untimed warm-up step) left out."""
    times = []
    for line in metrics_file.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(r, dict) and r.get("kind") == "train" and isinstance(r.get("step_time_s"), (int, float)):
            times.append(float(r["step_time_s"]))
    times = times[1:] if len(times) > 1 else times
    return sum(times) / len(times) if times else None


def read_one(d: Path) -> dict:
    """One finished run: valid loss, step time, inhibited layers, last held-out metrics per layer, histograms,
    held-out series over training."""
    from neox_l2e.analysis.runs import read_run

    run = read_run(d)
    last = {}
    for metric, by_layer in run.heldout.items():
        for layer, (_xs, ys) in by_layer.items():
            if ys:
                last.setdefault(layer, {})[metric] = ys[-1]
    return {
        "valid_loss": run.valid_loss[1][-1] if run.valid_loss[1] else None,
        "step_time_s": _step_time(d / "metrics.jsonl"),
        "inhibited": run.inhibited_layers,
        "heldout": last,
        "hist": run.heldout_hist,
        "series": {layer: xs_ys for layer, xs_ys in run.heldout.get("frac_phi_gt_5", {}).items()},
        **read_post(d),
    }


def read_post(d: Path) -> dict:
    """The phase-2 results of run d, as they are on disk: {"fkr": {layer: {k: FKR}}, "fkr_chance": {layer:
    chance}, "fkr_settings", "eval": {"task metric": (value, stderr)}, "eval_settings"}; absent parts left out."""
    out: dict = {}
    try:
        f = json.loads((d / FKR_FILE).read_text())
        out["fkr"] = {int(l["layer"]): {float(k): v for k, v in l["fkr"].items()} for l in f["layers"]}
        out["fkr_chance"] = {int(l["layer"]): l.get("chance") for l in f["layers"]}
        out["fkr_settings"] = f.get("settings")
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        pass
    try:
        e = json.loads((d / EVAL_FILE).read_text())
        res = e["runs"][0]
        out["eval"] = {
            f"{task} {m} ({res.get('num_fewshot', 0)}-shot)": (vals[m], vals.get(f"{m}_stderr"))
            for task, vals in res["results"].items()
            for m in ("acc", "acc_norm")
            if isinstance(vals.get(m), (int, float))
        }
        out["eval_settings"] = e.get("settings")
    except (OSError, json.JSONDecodeError, KeyError, TypeError, IndexError):
        pass
    return out


def _mean_sd(vals: Sequence[Optional[float]]) -> tuple:
    v = [x for x in vals if x is not None and math.isfinite(x)]
    if not v:
        return None, None, 0
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else None
    return m, sd, len(v)


def aggregate(
    runs: Dict[str, Dict[int, dict]], entries: Dict[str, dict], num_layers: int, reference_layers: Dict[str, List[int]]
) -> List[dict]:
    """One row per entry: mean / sd over seeds, paired differences against the baseline of the same seed."""
    base = runs.get("baseline", {})
    rows = []
    for name in entries:
        per_seed = runs.get(name, {})
        if not per_seed:
            continue
        layers = reference_layers[name]
        row = {"name": name, "seeds": sorted(per_seed), "layers": layers}

        def collect(fn, against_base=False, per_seed=per_seed):
            vals = []
            for s, r in per_seed.items():
                b = base.get(s)
                if against_base and b is None:
                    continue
                try:
                    vals.append(fn(r, b))
                except (KeyError, TypeError, ZeroDivisionError):
                    vals.append(None)
            return _mean_sd(vals)

        def inhibited_mean(r, metric, layers=layers):
            vs = [r["heldout"][i][metric] for i in layers]
            return sum(vs) / len(vs)

        row["valid_loss"] = collect(lambda r, b: r["valid_loss"])
        row["valid_change_pct"] = collect(lambda r, b: 100.0 * (r["valid_loss"] / b["valid_loss"] - 1), True)
        row["step_time_s"] = collect(lambda r, b: r["step_time_s"])
        row["overhead_pct"] = collect(lambda r, b: 100.0 * (r["step_time_s"] / b["step_time_s"] - 1), True)
        for metric in ("frac_phi_gt_5", "frac_phi_gt_25", "kurtosis_median", "max_phi_median", "var_ratio_median"):
            row[f"inh_{metric}"] = collect(lambda r, b, m=metric: inhibited_mean(r, m))
            row[f"base_{metric}"] = collect(lambda r, b, m=metric: inhibited_mean(b, m), True)
        row["per_layer"] = {}
        for layer in range(num_layers):
            row["per_layer"][layer] = {
                m: collect(lambda r, b, m=m, i=layer: r["heldout"][i][m]) for m, _, _ in PER_LAYER_TABLES
            }
        # local eval tasks: the score's mean ± sd over seeds, and lm-eval's stderr (mean over seeds)
        keys = []
        for r in per_seed.values():
            keys += [k for k in r.get("eval", {}) if k not in keys]
        row["eval"] = {
            k: {
                "value": collect(lambda r, b, k=k: r["eval"][k][0]),
                "stderr": collect(lambda r, b, k=k: r["eval"][k][1]),
                "vs_baseline": collect(lambda r, b, k=k: r["eval"][k][0] - b["eval"][k][0], True),
            }
            for k in keys
        }
        # FKR (per-token tau_k) on the entry's inhibited layers (mean over them), the baseline on the same layers
        ks = sorted({k for r in per_seed.values() for lay in r.get("fkr", {}).values() for k in lay})

        def fkr_mean(r, k, layers=layers):
            return sum(r["fkr"][i][k] for i in layers) / len(layers)

        row["fkr"] = {k: collect(lambda r, b, k=k: fkr_mean(r, k)) for k in ks}
        row["fkr_base"] = {k: collect(lambda r, b, k=k: fkr_mean(b, k), True) for k in ks}
        row["fkr_chance"] = collect(lambda r, b, ls=layers: sum(r["fkr_chance"][i] for i in ls) / len(ls))
        row["fkr_per_layer"] = {
            layer: {k: collect(lambda r, b, k=k, i=layer: r["fkr"][i][k]) for k in ks} for layer in range(num_layers)
        }
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------
# the report


def _ms(t: tuple, fmt: str, scale: float = 1.0) -> str:
    m, sd, n = t
    if m is None:
        return "-"
    s = format(m * scale, fmt)
    return s + (f" ± {format(sd * scale, fmt.lstrip('+'))}" if sd is not None else "")


def _eval_cell(e: Optional[dict]) -> str:
    """'0.3125 ± 0.0200 (se 0.060)': mean ± sd over seeds, lm-eval's stderr (mean over seeds) in brackets."""
    if not e or e["value"][0] is None:
        return "-"
    se = e["stderr"][0]
    return _ms(e["value"], ".4f") + (f" (se {se:.3f})" if se is not None else "")


def report_tables(rows: List[dict], num_layers: int) -> List[str]:
    eval_keys = []
    for r in rows:
        eval_keys += [k for k in r.get("eval", {}) if k not in eval_keys]
    lines = [
        "| entry | layers | seeds | valid loss | vs baseline | step time (ms) | overhead | "
        "held-out phi>5, its layers | baseline, same layers | held-out kurtosis med. | baseline | "
        "var held-out / running |" + "".join(f" {k} |" for k in eval_keys),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(eval_keys),
    ]
    for r in rows:
        lines.append(
            "| "
            + " | ".join(
                [
                    r["name"],
                    _layers_cell(r),
                    str(len(r["seeds"])),
                    _ms(r["valid_loss"], ".4f"),
                    _ms(r["valid_change_pct"], "+.2f") + " %" if r["name"] != "baseline" else "",
                    _ms(r["step_time_s"], ".0f", 1000.0),
                    _ms(r["overhead_pct"], "+.1f") + " %" if r["name"] != "baseline" else "",
                    _ms(r["inh_frac_phi_gt_5"], ".3e"),
                    _ms(r["base_frac_phi_gt_5"], ".3e") if r["name"] != "baseline" else "",
                    _ms(r["inh_kurtosis_median"], ".3f"),
                    _ms(r["base_kurtosis_median"], ".3f") if r["name"] != "baseline" else "",
                    _ms(r["inh_var_ratio_median"], ".3f"),
                    *(_eval_cell(r.get("eval", {}).get(k)) for k in eval_keys),
                ]
            )
            + " |"
        )
    lines += fkr_tables(rows, num_layers)
    for metric, title, fmt in PER_LAYER_TABLES:
        note = f"`ms_heldout/layer<i>/{metric}`, last evaluation; * = inhibited by that entry"
        lines += ["", f"{title} per layer ({note}):"]
        lines += ["", "| entry | " + " | ".join(f"layer {i}" for i in range(num_layers)) + " |"]
        lines.append("|---|" + "---:|" * num_layers)
        for r in rows:
            inh = set(r["layers"]) if r["name"] != "baseline" else set()
            cells = (_ms(r["per_layer"][i][metric], fmt) + (" *" if i in inh else "") for i in range(num_layers))
            lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return lines


# the held-out per-layer tables of the report: (metric, title, number format)
PER_LAYER_TABLES = (
    ("frac_phi_gt_5", "Held-out phi > 5", ".3e"),
    ("frac_phi_gt_25", "Held-out phi > 25", ".3e"),
    ("kurtosis_median", "Held-out median per-neuron kurtosis", ".3f"),
)


def _layers_cell(r: dict) -> str:
    """'1,2' (the layers the entry inhibits); for the baseline '(1,2)' (the reference layers it is read on)."""
    s = ",".join(map(str, r["layers"]))
    return s if r["name"] != "baseline" else f"({s})"


def fkr_tables(rows: List[dict], num_layers: int) -> List[str]:
    """FKR (per-token tau_k, %) per k on each entry's inhibited layers next to the baseline's on the same layers
    (paired seeds), with the chance FKR; then per layer at every k. Empty when no run has FKR results."""
    ks = sorted({k for r in rows for k in r.get("fkr", {})})
    if not ks:
        return []
    lines = [
        "",
        "FKR (per-token tau_k, % of kills outside the neuron's l*) on the entry's inhibited layers (mean over "
        "them) | the baseline on the same layers; chance = random kills:",
        "",
        "| entry | layers | seeds | " + " | ".join(f"k={k:g}% | base" for k in ks) + " | chance |",
        "|---|---|---:|" + "---:|---:|" * len(ks) + "---:|",
    ]
    for r in rows:
        cells = []
        for k in ks:
            cells.append(_ms(r["fkr"].get(k, (None, None, 0)), ".1f", 100.0))
            cells.append(_ms(r["fkr_base"].get(k, (None, None, 0)), ".1f", 100.0) if r["name"] != "baseline" else "")
        lines.append(
            f"| {r['name']} | {_layers_cell(r)} | {r['fkr'][ks[0]][2] if ks[0] in r['fkr'] else 0} | "
            + " | ".join(cells)
            + f" | {_ms(r['fkr_chance'], '.1f', 100.0)} |"
        )
    lines += [
        "",
        "FKR (%) per layer and k (mean ± sd over seeds; * = inhibited by that entry):",
        "",
        "| entry | k | " + " | ".join(f"layer {i}" for i in range(num_layers)) + " |",
        "|---|---:|" + "---:|" * num_layers,
    ]
    for r in rows:
        inh = set(r["layers"]) if r["name"] != "baseline" else set()
        for k in ks:
            lines.append(
                f"| {r['name']} | {k:g}% | "
                + " | ".join(
                    _ms(r["fkr_per_layer"][i].get(k, (None, None, 0)), ".1f", 100.0) + (" *" if i in inh else "")
                    for i in range(num_layers)
                )
                + " |"
            )
    return lines


def plot_figures(
    runs: Dict[str, Dict[int, dict]],
    entries: Dict[str, dict],
    reference_layers: Dict[str, List[int]],
    num_layers: int,
    out: Path,
) -> List[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    import numpy as np

    names = [n for n in entries if runs.get(n)]
    cmap = plt.get_cmap("tab20")
    colour = {n: ("black" if n == "baseline" else cmap(i % 20)) for i, n in enumerate(names)}
    cols = min(num_layers, 3)
    nrows = -(-num_layers // cols)
    written = []

    # 1. held-out phi distribution per layer (seeds pooled), as exceedance P(phi > x)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.8 * nrows), squeeze=False)
    for layer in range(num_layers):
        ax = axes[layer // cols][layer % cols]
        for n in names:
            hists = [r["hist"][layer] for r in runs[n].values() if r.get("hist") and layer in r["hist"]]
            if not hists:
                continue
            edges = np.asarray(next(iter(runs[n].values()))["hist"]["edges"], dtype=float)
            counts = np.sum(np.asarray(hists, dtype=float), axis=0)
            exceed = counts[::-1].cumsum()[::-1][1:] / counts.sum()  # P(phi >= edge_k)
            inh = n != "baseline" and layer in reference_layers[n]
            ax.loglog(
                edges,
                np.where(exceed > 0, exceed, np.nan),
                color=colour[n],
                lw=2.0 if inh else 1.0,
                ls="-" if (inh or n == "baseline") else ":",
                label=n + (" (inhibits)" if inh else ""),
            )
        ax.set_xlim(1e-1, edges[-1] if names else 1e5)
        ax.set_title(f"layer {layer}: held-out P(phi > x)")
        ax.set_xlabel("phi (fresh statistics on the held-out set)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6)
    for k in range(num_layers, nrows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.tight_layout()
    p = out / "phi_distribution.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(p)

    # 2. held-out phi > 5 over training, per layer (mean over seeds at each evaluation)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.8 * nrows), squeeze=False)
    for layer in range(num_layers):
        ax = axes[layer // cols][layer % cols]
        for n in names:
            by_step: Dict[float, List[float]] = {}
            for r in runs[n].values():
                xs, ys = r["series"].get(layer, ([], []))
                for x, y in zip(xs, ys):
                    by_step.setdefault(x, []).append(y)
            if not by_step:
                continue
            steps = sorted(by_step)
            inh = n != "baseline" and layer in reference_layers[n]
            ax.plot(
                steps,
                [sum(by_step[s]) / len(by_step[s]) for s in steps],
                marker="o",
                ms=3,
                color=colour[n],
                lw=2.0 if inh else 1.0,
                ls="-" if (inh or n == "baseline") else ":",
                label=n,
            )
        ax.set_yscale("log")
        ax.set_title(f"layer {layer}: held-out phi > 5 over training")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6)
    for k in range(num_layers, nrows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.tight_layout()
    p = out / "heldout_over_training.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(p)

    # 3. FKR against k per layer (mean ± sd over seeds), baseline against every entry, chance dashed
    if any(r.get("fkr") for n in names for r in runs[n].values()):
        fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.8 * nrows), squeeze=False, sharey=True)
        lowest = min(
            (
                100.0 * v
                for n in names
                for r in runs[n].values()
                for lay in r.get("fkr", {}).values()
                for v in lay.values()
                if v is not None and math.isfinite(v)
            ),
            default=0.0,
        )
        for layer in range(num_layers):
            ax = axes[layer // cols][layer % cols]
            chance = []
            ks_all = set()
            for n in names:
                by_k: Dict[float, List[float]] = {}
                for r in runs[n].values():
                    for k, v in r.get("fkr", {}).get(layer, {}).items():
                        if v is not None and math.isfinite(v):
                            by_k.setdefault(k, []).append(100.0 * v)
                    c = r.get("fkr_chance", {}).get(layer)
                    if c is not None:
                        chance.append(100.0 * c)
                if not by_k:
                    continue
                ks = sorted(by_k)
                ks_all |= set(ks)
                inh = n != "baseline" and layer in reference_layers[n]
                ax.errorbar(
                    ks,
                    [float(np.mean(by_k[k])) for k in ks],
                    yerr=[float(np.std(by_k[k], ddof=1)) if len(by_k[k]) > 1 else 0.0 for k in ks],
                    marker="s" if inh else "o",
                    ms=3,
                    capsize=2,
                    color=colour[n],
                    lw=2.0 if inh else 1.0,
                    ls="-" if (inh or n == "baseline") else ":",
                    label=n + (" (inhibits)" if inh else ""),
                    zorder=3 if n == "baseline" else 2,  # the baseline stays visible under the entries
                )
            if chance:
                ax.axhline(float(np.mean(chance)), color="0.35", ls="--", lw=1.2, label="chance (random kills)")
            ax.set_xscale("log")
            if ks_all:
                ax.set_xticks(sorted(ks_all))
                ax.set_xticklabels([f"{k:g}" for k in sorted(ks_all)])
                ax.minorticks_off()
            ax.set_ylim(max(0.0, 10.0 * math.floor(lowest / 10.0) - 10.0), 100)
            ax.set_title(f"layer {layer}: FKR, per-token tau_k")
            ax.set_xlabel("k (% of neurons)")
            ax.set_ylabel("FKR (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
        for k in range(num_layers, nrows * cols):
            axes[k // cols][k % cols].axis("off")
        fig.tight_layout()
        p = out / "fkr.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    return written


def _post_head(runs: Dict[str, Dict[int, dict]]) -> List[str]:
    """Header lines naming the FKR and eval settings of the result files found (and saying when they differ)."""
    lines = []
    for part, key in (("FKR", "fkr_settings"), ("eval tasks", "eval_settings")):
        seen = {}
        missing = 0
        for n, per_seed in runs.items():
            for s, r in per_seed.items():
                if r.get(key) is None:
                    missing += 1
                else:
                    seen.setdefault(json.dumps(r[key], sort_keys=True), []).append(f"{n}/seed{s}")
        if not seen:
            lines.append(f"- {part}: no results in the run folders")
            continue
        for txt, who in seen.items():
            st = json.loads(txt)
            st.pop("data_sha256", None)
            where = "" if len(seen) == 1 else f" (runs {', '.join(who)})"
            lines.append(f"- {part} settings{where}: {json.dumps(st)}")
        if len(seen) > 1:
            lines.append(f"- WARNING: the {part} results were made with different settings (above)")
        if missing:
            lines.append(f"- {part}: {missing} finished run(s) without results (left out of those columns)")
    return lines


def build_report(
    configs: Sequence[str],
    entries: Dict[str, dict],
    seeds: Sequence[int],
    out: Path,
    overrides: Dict[str, object],
    command: str,
    log=print,
    notes: Sequence[str] = (),
) -> dict:
    from neox_l2e.config import load_config
    from neox_l2e.config.loader import resolve_layers

    cfg = load_config(list(configs), {k: v for k, v in overrides.items()})
    L = cfg.model.num_layers
    reference_layers = {n: resolve_layers(e.get("l2e_layers", cfg.l2e.l2e_layers), L) for n, e in entries.items()}
    runs: Dict[str, Dict[int, dict]] = {}
    missing = []
    for n in entries:
        for s in seeds:
            d = out / n / f"seed{s}"
            if (d / "done.json").is_file():
                runs.setdefault(n, {})[s] = read_one(d)
            else:
                missing.append(f"{n}/seed{s}")
    if not runs:
        raise GridError(f"{out}: no finished runs to report on")
    rows = aggregate(runs, entries, L, reference_layers)
    figures = plot_figures(runs, entries, reference_layers, L, out)
    try:
        import torch

        torch_v = torch.__version__
    except ImportError:
        torch_v = "?"
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
        f"python {platform.python_version()}, torch {torch_v}, load average "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg()) if hasattr(os, 'getloadavg') else '?'}"
    )
    head = [
        "# L2E grid report",
        "",
        f"- command: `{command}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- machine: {machine}",
        f"- configs: {', '.join(Path(c).name for c in configs)}; overrides: "
        f"{json.dumps({k: v for k, v in overrides.items() if 'path' not in k and k != 'vocab_file'})}",
        f"- model: {L} layers x {cfg.model.hidden_size}, seq {cfg.model.seq_length}; "
        f"{cfg.training.train_iters} steps of {cfg.training.train_micro_batch_size_per_gpu} x "
        f"{cfg.training.gradient_accumulation_steps} sequences; seeds {', '.join(map(str, seeds))}",
        "- values: mean ± sample standard deviation over seeds; 'vs baseline' and 'overhead' are paired with "
        "the baseline of the same seed; held-out = `ms_heldout/...` at the last evaluation (phi of Eq. 1 on a "
        "fixed held-out set, statistics fresh on it); 'its layers' = the layers the entry inhibits (the "
        "baseline column: the baseline on those same layers)",
        *_post_head(runs),
        *(f"- {n}" for n in notes),
        "",
    ]
    if missing:
        head += [f"- not finished (left out): {', '.join(missing)}", ""]
    lines = head + report_tables(rows, L) + [""] + [f"![{p.stem}]({p.name})" for p in figures]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "report.json").write_text(
        json.dumps(
            {
                "command": command,
                "configs": list(configs),
                "overrides": overrides,
                "seeds": list(seeds),
                "rows": rows,
                "missing": missing,
            },
            indent=2,
            default=str,
        )
    )
    log("\n".join(report_tables(rows, L)[: len(rows) + 2]))
    log(f"wrote {out / 'report.md'}, report.json" + "".join(f", {p.name}" for p in figures))
    return {"rows": rows, "missing": missing, "figures": [str(p) for p in figures]}


def main(argv=None, log=print) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="key=value config overrides for every run (e.g. train-iters=100)")
    p.add_argument(
        "--config",
        nargs="+",
        default=[str(ROOT / "configs/local/demo.yml")],
        help="yml files of the model and training setup (default: configs/local/demo.yml)",
    )
    p.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (default 1,2,3)")
    p.add_argument(
        "--grid",
        default="full",
        choices=["full", "small"],
        help="full: the paper's 13 entries; small: baseline, l2e-2pct-mid2, memel-2pct-mid2",
    )
    p.add_argument("--only", default=None, help="comma-separated entry names or patterns (e.g. 'baseline,l2e-*-mid2')")
    p.add_argument("--out", default=str(ROOT / "runs/grid"), help="output folder (default runs/grid)")
    p.add_argument("--data-root", default=str(ROOT / "data/shakespeare"), help="where the default corpus is prepared")
    p.add_argument("--no-corpus", action="store_true", help="use the data paths of the configs as they are")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="training runs at once, each in its own process with max(1, CPUs // jobs) threads (default 1)",
    )
    p.add_argument(
        "--no-checkpoints",
        action="store_true",
        help="keep no checkpoint (by default each run keeps its final one, about 12 bytes per parameter: "
        f"{CKPT_MB_PER_RUN_DEMO} MB per run on the demo config); FKR and eval are then not run",
    )
    p.add_argument(
        "--fkr-data",
        default=str(DEFAULT_FKR_DATA),
        help="labelled jsonl for FKR (default data/labelled/code_en.jsonl, built with "
        "tools/build_labelled_dataset.py's defaults when absent); 'none': no FKR",
    )
    p.add_argument("--fkr-k", default=None, help="FKR k values in percent (default: the config's l2e-fkr-k)")
    p.add_argument(
        "--fkr-tokens-per-label",
        type=int,
        default=4000,
        help="tokens per label the FKR scan reads (default 4000; windows of at most 256 tokens)",
    )
    p.add_argument(
        "--eval-tasks",
        default="tiny_shakespeare",
        help="comma-separated local eval tasks (configs/eval; tools/evaluate.py's short names; default "
        "tiny_shakespeare, built from the default corpus when absent); 'none': no eval",
    )
    p.add_argument("--eval-limit", type=float, default=None, help="examples per task (int) or fraction (default all)")
    p.add_argument("--eval-shots", type=int, default=0, help="few-shot examples per prompt (default 0)")
    p.add_argument(
        "--eval-data-dir", default=str(DEFAULT_EVAL_DIR), help="folder with <task>.jsonl (default data/eval)"
    )
    p.add_argument(
        "--report-only", action="store_true", help="train and evaluate nothing; report on what the run folders hold"
    )
    args = p.parse_args(argv)
    from neox_l2e.config import ConfigError, load_config, parse_override

    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        p.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    if not seeds:
        p.error("--seeds: give at least one seed")
    if args.jobs < 1:
        p.error("--jobs: at least 1")
    command = "python tools/l2e_grid.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out).resolve()
    try:
        entries = select_entries(args.grid, args.only)
        overrides = dict(parse_override(o) for o in args.overrides)
        if not args.no_corpus:
            from l2e_sweep import corpus_overrides

            overrides = {**corpus_overrides(str(Path(args.data_root).resolve())), **overrides}
        cfg = load_config(list(args.config), dict(overrides))
        if args.fkr_k:
            from neox_l2e.analysis.cli import parse_percent_list

            ks = parse_percent_list(args.fkr_k, "--fkr-k")
        else:
            ks = [float(k) for k in cfg.l2e.l2e_fkr_k]
        tasks = (
            [] if args.eval_tasks.strip().lower() == "none" else [t for t in args.eval_tasks.split(",") if t.strip()]
        )
        if args.eval_limit is not None and args.eval_limit <= 0:
            raise GridError("--eval-limit must be positive")
        opts = PostOptions(
            fkr_data=None if args.fkr_data.strip().lower() == "none" else Path(args.fkr_data).resolve(),
            fkr_ks=ks,
            fkr_tokens_per_label=args.fkr_tokens_per_label,
            eval_tasks=tasks,
            eval_limit=None
            if args.eval_limit is None
            else (int(args.eval_limit) if args.eval_limit >= 1 else args.eval_limit),
            eval_shots=args.eval_shots,
            eval_data_dir=Path(args.eval_data_dir).resolve(),
        )
        notes = []
        if args.no_checkpoints and opts.active:
            notes.append("FKR and eval tasks: not run (--no-checkpoints: the runs keep no checkpoint)")
            log(notes[-1])
            opts = PostOptions()
        out.mkdir(parents=True, exist_ok=True)
        configs = [str(Path(c).resolve()) if Path(c).exists() else c for c in args.config]
        if not args.report_only:
            if opts.active:
                prepare_post(opts, log=log)
            records = run_grid(
                args.config,
                entries,
                seeds,
                out,
                overrides,
                jobs=args.jobs,
                keep_checkpoints=not args.no_checkpoints,
                needs_checkpoint=(lambda n, s, d: bool(post_todo(d, opts))) if opts.active else None,
                train_configs=configs,
                log=log,
            )
            if opts.active:
                post_process(records, opts, log=log)
        build_report(args.config, entries, seeds, out, overrides, command, log=log, notes=notes)
    except (ConfigError, GridError, RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted: finished runs and results are kept; run the same command again to continue", file=sys.stderr
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
