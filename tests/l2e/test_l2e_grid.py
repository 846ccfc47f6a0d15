"""tools/l2e_grid.py end to end on the tiny config: a reduced grid, 2 seeds, a few steps, two runs at a time; FKR
and the eval task on each run's checkpoint; resumable; one report whose numbers are the per-run result files'."""

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import l2e_grid  # noqa: E402

VOCAB = 300
ENTRIES = ("baseline", "l2e-2pct-mid2")
SEEDS = (1, 2)


def test_grid_entries_are_the_papers_grid():
    names = list(l2e_grid.grid_entries())
    assert names[0] == "baseline" and len(names) == 1 + 9 + 3
    assert {"l2e-1pct-mid2", "l2e-2pct-mid-third", "l2e-3pct-top-bot", "memel-3pct-mid2"} <= set(names)
    assert l2e_grid.grid_entries()["l2e-3pct-top-bot"] == {
        "l2e_enabled": True,
        "l2e_method": "l2e",
        "l2e_layers": "top-bot",
        "l2e_ratio": 0.03,
    }
    assert list(l2e_grid.select_entries("full", "baseline,l2e-*-mid2")) == [
        "baseline",
        "l2e-1pct-mid2",
        "l2e-2pct-mid2",
        "l2e-3pct-mid2",
    ]
    assert list(l2e_grid.select_entries("small", None)) == list(l2e_grid.SMALL)
    with pytest.raises(l2e_grid.GridError, match="--only 'l2e-9pct' matches no grid entry"):
        l2e_grid.select_entries("full", "l2e-9pct")


def test_eta_shares_the_work_between_the_slots():
    assert l2e_grid._eta(10.0, 4, [], 2) == 20.0
    assert l2e_grid._eta(10.0, 1, [4.0, 12.0], 2) == (10.0 + 6.0 + 0.0) / 2
    assert math.isnan(l2e_grid._eta(float("nan"), 3, [], 1))  # no run finished yet: unknown


def _inputs(root: Path) -> dict:
    """Token data, a tiny byte-level BPE tokenizer, a labelled jsonl (two labels), a tiny_shakespeare-format task."""
    sys.path.insert(0, str(ROOT / "tests/analysis"))
    from analysis_helpers import train_tokenizer

    from neox_l2e.data import write_indexed_dataset

    rng = random.Random(0)
    code = ["def f(x):", "return x + 1", "for i in range(10):", "import os", "if x == 0:", "print(x)", "self.x = y"]
    prose = ["the king is dead", "long live the king", "to be or not to be", "my lord, I pray you", "good night"]
    recs = []
    for _ in range(30):
        recs.append({"text": "\n".join(rng.choice(code) for _ in range(12)), "label": "code"})
        recs.append({"text": " ".join(rng.choice(prose) for _ in range(12)), "label": "english"})
    (root / "labelled.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    tok = train_tokenizer([r["text"] for r in recs], root / "tokenizer.json", vocab=VOCAB)
    (root / "eval").mkdir()
    rows = [{"context": rng.choice(prose), "choices": rng.sample(prose, 4), "label": i % 4} for i in range(8)]
    (root / "eval" / "tiny_shakespeare.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    g = np.random.default_rng(0)
    docs = [list(g.integers(1, VOCAB, size=int(g.integers(20, 60)))) for _ in range(120)]
    return {
        "train": write_indexed_dataset(str(root / "train"), docs[:100], vocab_size=VOCAB),
        "valid": write_indexed_dataset(str(root / "valid"), docs[100:], vocab_size=VOCAB),
        "tok": tok,
        "labelled": root / "labelled.jsonl",
        "eval": root / "eval",
    }


def _argv(inp: dict, out: Path, *extra) -> list:
    return [
        "--config",
        str(ROOT / "configs/local/tiny.yml"),
        "--no-corpus",
        "--seeds",
        ",".join(map(str, SEEDS)),
        "--only",
        ",".join(ENTRIES),
        "--out",
        str(out),
        "--fkr-data",
        str(inp["labelled"]),
        "--fkr-tokens-per-label",
        "300",
        "--fkr-k",
        "1,5,10",
        "--eval-data-dir",
        str(inp["eval"]),
        f'train-data-paths=["{inp["train"]}"]',
        f'valid-data-paths=["{inp["valid"]}"]',
        f"vocab-size={VOCAB}",
        "tokenizer-type=HFTokenizer",
        f"vocab-file={inp['tok']}",
        "eval-interval=2",
        "log-interval=1",
        "ms-heldout-tokens=256",
        "l2e-min-samples=8",
        *extra,
    ]


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """One grid run (2 entries x 2 seeds, 4 steps, --jobs 2) shared by the assertions below."""
    root = tmp_path_factory.mktemp("grid")
    inp = _inputs(root)
    out = root / "grid"
    argv = _argv(inp, out, "train-iters=4", "--jobs", "2")
    lines = []
    assert l2e_grid.main(argv, log=lines.append) == 0, "\n".join(lines)
    return {"inp": inp, "out": out, "argv": argv, "log": "\n".join(lines), "root": root}


def _mean(xs):
    return sum(xs) / len(xs)


def _run_files(out: Path, name: str, seed: int) -> tuple:
    d = out / name / f"seed{seed}"
    return json.loads((d / "fkr.json").read_text()), json.loads((d / "eval.json").read_text())


def test_two_at_a_time_then_fkr_and_eval_per_run(grid):
    out, text = grid["out"], grid["log"]
    assert "2 entries x 2 seeds = 4 runs; 0 finished already (skipped), 4 to run" in text
    assert "2 at a time, 1 CPU thread(s) each" in text or f"2 at a time, {(os.cpu_count() or 1) // 2}" in text
    assert text.count("[started ") == 4 and text.count("[done ") == 4 and "ETA" in text
    # two ran at once: the second run started before the first one finished
    order = [ln.split("]")[0] for ln in text.splitlines() if ln.startswith(("[started", "[done"))]
    assert order[:2] == ["[started 1/4", "[started 2/4"], order
    for name in ENTRIES:
        for seed in SEEDS:
            d = out / name / f"seed{seed}"
            done = json.loads((d / "done.json").read_text())
            assert done["checkpoint"] is True and done["jobs"] == 2
            assert (d / "checkpoints" / "latest").is_file()
            assert len(list((d / "checkpoints").glob("global_step*"))) == 1  # the final one only
            assert not (d / "train.pid").exists()
            fkr, ev = _run_files(out, name, seed)
            assert [l["layer"] for l in fkr["layers"]] == [0, 1] and set(fkr["labels"]) == {"code", "english"}
            assert set(fkr["layers"][0]["fkr"]) == {"1", "5", "10"}
            assert fkr["settings"]["dtype"] == ev["settings"]["dtype"] in ("float32", "bfloat16")
            assert fkr["settings"]["tokens_per_label"] == 300 and all(
                v <= 300 for v in fkr["tokens_per_label"].values()
            )
            assert ev["runs"][0]["model"] == f"{name}/seed{seed}" and ev["runs"][0]["n_samples"]
            assert 0.0 <= ev["runs"][0]["results"]["tiny_shakespeare"]["acc"] <= 1.0
    # FKR differs between the runs (different models), so a mix-up of runs would show
    vals = {(n, s): _run_files(out, n, s)[0]["layers"][1]["fkr"]["10"] for n in ENTRIES for s in SEEDS}
    assert len(set(vals.values())) > 1
    for fig in ("phi_distribution.png", "heldout_over_training.png", "fkr.png"):
        assert (out / fig).stat().st_size > 1000


def _check_report_against_files(out: Path):
    """Every FKR and eval number of report.json is the mean / sd of that entry's own per-run files."""
    rows = {r["name"]: r for r in json.loads((out / "report.json").read_text())["rows"]}
    assert list(rows) == list(ENTRIES)
    for name in ENTRIES:
        files = [_run_files(out, name, s) for s in SEEDS]
        layers = rows[name]["layers"]
        for k in ("1", "5", "10"):
            per_seed = [_mean([f["layers"][i]["fkr"][k] for i in layers]) for f, _ in files]
            m, sd, n = rows[name]["fkr"][str(float(k))]
            assert n == 2 and m == pytest.approx(_mean(per_seed), abs=1e-12)
            assert sd == pytest.approx(float(np.std(per_seed, ddof=1)), abs=1e-12)
            base = [
                _mean([f["layers"][i]["fkr"][k] for i in layers])
                for f, _ in (_run_files(out, "baseline", s) for s in SEEDS)
            ]
            assert rows[name]["fkr_base"][str(float(k))][0] == pytest.approx(_mean(base), abs=1e-12)
        for metric in ("acc", "acc_norm"):
            key = f"tiny_shakespeare {metric} (0-shot)"
            per_seed = [e["runs"][0]["results"]["tiny_shakespeare"][metric] for _, e in files]
            cell = rows[name]["eval"][key]
            assert cell["value"][0] == pytest.approx(_mean(per_seed), abs=1e-12) and cell["value"][2] == 2
            ses = [e["runs"][0]["results"]["tiny_shakespeare"][f"{metric}_stderr"] for _, e in files]
            assert cell["stderr"][0] == pytest.approx(_mean(ses), abs=1e-12)
    return rows


def test_report_numbers_are_the_per_run_files(grid):
    rows = _check_report_against_files(grid["out"])
    md = (grid["out"] / "report.md").read_text()
    assert "| l2e-2pct-mid2 | 0,1 | 2 |" in md and "| baseline | (0,1) | 2 |" in md
    assert "tiny_shakespeare acc (0-shot)" in md and "tiny_shakespeare acc_norm (0-shot)" in md
    assert "| entry | layers | seeds | k=1% | base | k=5% | base | k=10% | base | chance |" in md
    assert "FKR settings:" in md and "eval tasks settings:" in md and "machine:" in md
    for title in ("Held-out phi > 5 per layer", "Held-out phi > 25 per layer", "median per-neuron kurtosis per layer"):
        assert title in md, title
    assert rows["l2e-2pct-mid2"]["per_layer"]["0"]["frac_phi_gt_25"][2] == 2  # two seeds behind each per-layer cell
    assert rows["l2e-2pct-mid2"]["valid_change_pct"][2] == 2 and rows["l2e-2pct-mid2"]["overhead_pct"][2] == 2
    assert rows["baseline"]["inh_var_ratio_median"][2] == 0 and rows["l2e-2pct-mid2"]["inh_var_ratio_median"][2] == 2


def test_resume_keeps_results_retrains_only_a_run_without_checkpoint(grid):
    """Rerun: training and FKR / eval are skipped where their results exist (planted distinct scores per entry
    survive and land in the right rows); a finished run whose checkpoint and fkr.json are gone is trained again,
    and only its FKR is recomputed."""
    import shutil

    out = grid["out"]
    planted = {}
    for i, name in enumerate(ENTRIES):
        for seed in SEEDS:
            e_path = out / name / f"seed{seed}" / "eval.json"
            e = json.loads(e_path.read_text())
            acc = 0.1 * (i + 1) + 0.01 * seed  # distinct per entry and seed
            e["runs"][0]["results"]["tiny_shakespeare"]["acc"] = acc
            e_path.write_text(json.dumps(e))
            planted[(name, seed)] = acc
    gone = out / "l2e-2pct-mid2" / "seed2"
    shutil.rmtree(gone / "checkpoints")
    (gone / "fkr.json").unlink()
    old_eval = (gone / "eval.json").read_text()
    lines = []
    assert l2e_grid.main(grid["argv"], log=lines.append) == 0
    text = "\n".join(lines)
    assert "3 finished already (skipped), 1 to run" in text
    assert "trained again: l2e-2pct-mid2/seed2" in text
    assert "4 finished runs; 3 up to date (skipped), 1 to do" in text
    assert (gone / "checkpoints" / "latest").is_file() and (gone / "fkr.json").is_file()
    assert (gone / "eval.json").read_text() != old_eval  # the retrained run's folder started over
    rows = _check_report_against_files(out)
    for (name, seed), acc in planted.items():
        if (name, seed) != ("l2e-2pct-mid2", 2):  # kept, not recomputed
            assert _run_files(out, name, seed)[1]["runs"][0]["results"]["tiny_shakespeare"]["acc"] == acc
    key = "tiny_shakespeare acc (0-shot)"
    assert rows["baseline"]["eval"][key]["value"][0] == pytest.approx(_mean([planted[("baseline", s)] for s in SEEDS]))
    assert rows["l2e-2pct-mid2"]["eval"][key]["value"][0] != rows["baseline"]["eval"][key]["value"][0]
    # nothing left to train; --no-checkpoints says in one line that FKR / eval are not run, and keeps the runs
    lines = []
    assert l2e_grid.main(grid["argv"] + ["--no-checkpoints"], log=lines.append) == 0
    text = "\n".join(lines)
    assert "4 finished already (skipped), 0 to run" in text
    assert "FKR and eval tasks: not run (--no-checkpoints" in text and "to do" not in text
    _check_report_against_files(out)  # the results on disk still make the report


def test_ctrl_c_stops_the_training_children(grid):
    out = grid["root"] / "interrupted"
    argv = _argv(grid["inp"], out, "train-iters=100000", "--jobs", "2")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    # SIGINT back to its default in the child: a test process started in the background (nohup, `&`) inherits
    # SIGINT ignored, and Python then installs no KeyboardInterrupt handler, so Ctrl-C could not be simulated
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tools/l2e_grid.py"), *argv],
        env=env,
        cwd=ROOT,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    pids = []
    deadline = time.time() + 120
    while time.time() < deadline and len(pids) < 2:
        pids = [int(p.read_text()) for p in out.glob("*/seed*/train.pid") if p.read_text().strip()]
        time.sleep(0.2)
    try:
        assert len(pids) == 2, "the two training runs did not start"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        assert not list(out.glob("*/seed*/done.json"))
    finally:  # a failure must not leave training processes running for the rest of the suite
        for pid in pids:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if proc.poll() is None:
            proc.kill()
            proc.wait()
