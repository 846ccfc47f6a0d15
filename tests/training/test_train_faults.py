"""Faults in real processes: a save killed with SIGKILL leaves the previous checkpoint usable; a crashed
rank makes the other exit with an error (no hang); Ctrl-C saves a checkpoint; bad launches fail in one line."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from distributed import clean_env, free_port
from train_common import REPO

PY = sys.executable
RUN = str(Path(__file__).resolve().parent / "run_synthetic.py")


def _env(**extra):
    return clean_env(**{"NEOX_L2E_DS_SHM": "0", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra})


def _result(stdout: str) -> dict:
    lines = [l for l in stdout.splitlines() if l.startswith("RESULT ")]
    assert lines, stdout[-2000:]
    return json.loads(lines[-1][len("RESULT ") :])


def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path):
    from neox_l2e.checkpoint import latest_tag, list_tags, read_model_states

    save = tmp_path / "ck"
    p = subprocess.run(
        [PY, RUN, f"save={save}", "checkpoint_factor=3", "train_iters=9", "lr_decay_iters=9"],
        env=_env(TEST_KILL_IN_SAVE=6),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert latest_tag(save) == "global_step3"
    assert list_tags(save) == ["global_step3"]
    assert (save / ".tmp-global_step6").is_dir()  # the torn save, never pointed at
    cfg, states, client = read_model_states(save)
    assert client["iteration"] == 3 and cfg["train_iters"] == 9 and len(states) == 1
    # the run resumes from the previous checkpoint and finishes; the stale temp folder is cleaned up
    p = subprocess.run(
        [
            PY,
            RUN,
            f"save={save}",
            f"load={save}",
            "checkpoint_factor=3",
            "train_iters=9",
            "lr_decay_iters=9",
            "keep_last_n_checkpoints=2",
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    r = _result(p.stdout)
    assert r["start"] == 3 and r["iteration"] == 9 and len(r["losses"]) == 6
    assert latest_tag(save) == "global_step9"
    assert list_tags(save) == ["global_step6", "global_step9"]  # keep-last-n = 2
    assert not any(x.name.startswith(".tmp-") for x in save.iterdir())
    # and it equals an uninterrupted run (bitwise, fp32)
    p = subprocess.run(
        [PY, RUN, "train_iters=9", "lr_decay_iters=9"], env=_env(), capture_output=True, text=True, timeout=300
    )
    assert _result(p.stdout)["losses"][3:] == r["losses"]


def _spawn_ranks(world, args, **env):
    port = free_port()
    procs = []
    for rank in range(world):
        e = _env(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=world, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **env)
        procs.append(
            subprocess.Popen([PY, RUN] + args, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    return procs


def test_dead_rank_ends_the_run(tmp_path):
    t0 = time.time()
    procs = _spawn_ranks(2, ["train_iters=50", "dist_timeout_s=20"], DIE_AT="3@1")
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a rank hung after its peer died")
        outs.append((p.returncode, err))
    assert outs[1][0] == 17  # the crashed rank
    assert outs[0][0] not in (0, None), outs[0][1][-2000:]  # the survivor stopped with an error
    assert time.time() - t0 < 100


def test_interrupt_saves_checkpoint(tmp_path):
    from neox_l2e.checkpoint import latest_tag, read_model_states

    save = tmp_path / "ck"
    p = subprocess.Popen(
        [PY, RUN, f"save={save}", "train_iters=100000", "log_interval=1"],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # wait until training is under way
    deadline = time.time() + 120
    metrics = save / "metrics.jsonl"
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count('"train"') >= 3):
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    r = _result(out)
    assert r["interrupted"] is True and 3 <= r["iteration"] < 100000
    assert latest_tag(save) == f"global_step{r['iteration']}"
    assert read_model_states(save)[2]["iteration"] == r["iteration"]


def _one_line_error(p):
    assert p.returncode == 2, (p.returncode, p.stdout[-1000:], p.stderr[-2000:])
    lines = [l for l in p.stderr.splitlines() if l.strip() and "[WARNING]" not in l]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert "Traceback" not in p.stderr
    return lines[0]


def test_bad_world_size_fails_in_one_line():
    tiny = str(REPO / "configs/local/tiny.yml")
    # train.py started as rank 0 of 3 with TP 2: refused before any process group is created
    p = subprocess.run(
        [PY, str(REPO / "train.py"), tiny, "model-parallel-size=2"],
        env=_env(RANK=0, WORLD_SIZE=3, LOCAL_RANK=0, MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port()),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    line = _one_line_error(p)
    assert "model-parallel-size 2 does not divide the world size 3" in line
    # deepy.py checks the launch before starting anything
    p = subprocess.run(
        [PY, str(REPO / "deepy.py"), "--num_gpus", "3", "train.py", tiny, "model-parallel-size=2"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert "world size 3" in _one_line_error(p)
    p = subprocess.run(
        [PY, str(REPO / "train.py"), "no/such.yml"], env=_env(), capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert "no/such.yml" in _one_line_error(p)


def test_deepy_dry_run_command():
    tiny = str(REPO / "configs/local/tiny.yml")
    p = subprocess.run(
        [
            PY,
            str(REPO / "deepy.py"),
            "--dry-run",
            "--num_gpus",
            "2",
            "--master_port",
            "29611",
            "train.py",
            tiny,
            "train-iters=3",
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert p.returncode == 0, p.stderr
    cmd = p.stdout.strip().split()
    assert cmd[1:3] == ["-m", "deepspeed.launcher.runner"]
    assert cmd[cmd.index("--num_gpus") + 1] == "2" and cmd[cmd.index("--master_port") + 1] == "29611"
    assert "train.py" in cmd and "--config-b64" in cmd
    import base64

    resolved = json.loads(base64.b64decode(cmd[cmd.index("--config-b64") + 1]))
    assert resolved["train_iters"] == 3 and resolved["hidden_size"] == 32


def test_deepy_slurm_launch_hands_the_ranks_a_rendezvous(tmp_path):
    """srun / mpirun export no MASTER_ADDR to the ranks: deepy.py puts master-addr (default: the hostfile's first
    host that --include / --exclude leave) and master-port into the resolved config, which the ranks fall back on."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=2\nnode-b slots=2\n")
    tiny = str(REPO / "configs/local/tiny.yml")
    for extra, addr in (
        ([], "node-a"),
        (["--master_addr", "10.1.2.3"], "10.1.2.3"),
        (["--exclude", "node-a"], "node-b"),
        (["--include", "node-b"], "node-b"),
        (["--exclude", "node-a:0"], "node-a"),
    ):
        p = subprocess.run(
            [
                PY,
                str(REPO / "deepy.py"),
                "--dry-run",
                "--hostfile",
                str(hostfile),
                "--launcher",
                "slurm",
                "--master_port",
                "29612",
            ]
            + extra
            + ["train.py", tiny],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
        )
        assert p.returncode == 0, p.stderr
        cmd = p.stdout.strip().split()
        assert cmd[cmd.index("--launcher") + 1] == "slurm" and cmd[cmd.index("--master_addr") + 1] == addr
        import base64

        resolved = json.loads(base64.b64decode(cmd[cmd.index("--config-b64") + 1]))
        assert resolved["master_addr"] == addr and resolved["master_port"] == 29612


def test_deepy_launches_two_cpu_ranks(tmp_path):
    """deepy.py -> DeepSpeed launcher -> 2 ranks, each with the resolved config (train-iters from the command line)."""
    tiny = str(REPO / "configs/local/tiny.yml")
    p = subprocess.run(
        [
            PY,
            str(REPO / "deepy.py"),
            "--num_gpus",
            "2",
            "--master_port",
            str(free_port()),
            RUN,
            tiny,
            "train-iters=3",
            f"save={tmp_path / 'ck'}",
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-3000:])
    r = _result(p.stdout)
    assert r["iteration"] == 3 and r["checkpoints"] == ["global_step3"]
    assert "world size 2 | layout TP 1 x DP 2" in p.stdout


def test_train_py_end_to_end_on_indexed_data(tmp_path):
    """train.py on NeoX .bin/.idx data: trains, evaluates, saves, logs metrics.jsonl; then resumes."""
    import numpy as np

    from neox_l2e.checkpoint import latest_tag
    from neox_l2e.data import write_indexed_dataset

    g = np.random.default_rng(0)
    docs = [((g.integers(0, 63) + g.integers(1, 4) * np.arange(40)) % 63).tolist() + [63] for _ in range(60)]
    train = write_indexed_dataset(tmp_path / "train", docs[:50], vocab_size=64)
    valid = write_indexed_dataset(tmp_path / "valid", docs[50:], vocab_size=64)
    data = tmp_path / "data.yml"
    data.write_text(f"train-data-paths: ['{train}']\nvalid-data-paths: ['{valid}']\n")
    save = tmp_path / "run"
    args = [
        PY,
        str(REPO / "train.py"),
        str(REPO / "configs/local/tiny.yml"),
        str(data),
        f"save={save}",
        "train-iters=8",
        "lr-decay-iters=12",
        "eval-interval=4",
    ]
    p = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "world size 1 | layout TP 1 x DP 1 | ZeRO stage 0 | precision fp32" in p.stdout
    recs = [json.loads(l) for l in (save / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if r["kind"] == "train"]
    valid_recs = [r for r in recs if r["kind"] == "valid"]
    assert [r["iteration"] for r in valid_recs] == [4, 8]
    assert train_recs[-1]["lm_loss"] < train_recs[0]["lm_loss"]
    assert {"lr", "tokens_per_s", "step_time_s", "grad_norm"} <= train_recs[-1].keys()
    assert latest_tag(save) == "global_step8" and (save / "tensorboard").is_dir()
    p = subprocess.run(
        args[:-3] + ["train-iters=12", "lr-decay-iters=12", "eval-interval=4", f"load={save}"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stdout and latest_tag(save) == "global_step12"


def test_train_py_exits_non_zero_when_the_run_ends_non_finite(tmp_path):
    """train.py whose last step has a NaN loss (skipped, no update) exits 1 with one error line (it exited 0)."""
    import numpy as np

    from neox_l2e.data import write_indexed_dataset

    g = np.random.default_rng(0)
    docs = [((g.integers(0, 63) + g.integers(1, 4) * np.arange(40)) % 63).tolist() + [63] for _ in range(30)]
    train = write_indexed_dataset(tmp_path / "train", docs, vocab_size=64)
    data = tmp_path / "data.yml"
    data.write_text(f"train-data-paths: ['{train}']\n")
    p = subprocess.run(
        [
            PY,
            str(Path(__file__).resolve().parent / "run_train_py.py"),
            str(REPO / "configs/local/tiny.yml"),
            str(data),
            "train-iters=2",
        ],
        env=_env(TEST_NAN_STEPS="1"),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    lines = [l for l in p.stderr.splitlines() if l.startswith("error:")]
    assert p.returncode == 1 and len(lines) == 1, p.stderr[-3000:]
    assert "the last step (2) had a NaN/inf loss" in lines[0]
