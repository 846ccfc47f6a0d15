"""Ranks started by srun / mpirun (DeepSpeed's slurm, openmpi and mvapich runners) carry only their launcher's
variables (SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, OMPI_COMM_WORLD_*, MV2_COMM_WORLD_*) and, from the user,
MASTER_ADDR / MASTER_PORT. neox_l2e.parallel.launch_info maps them; both entry points (init_distributed and the
trainer's setup_distributed) form one gloo world from them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from distributed import clean_env, free_port

REPO = Path(__file__).resolve().parents[2]


# one rank: initialise through the given entry point, then prove the world is one (all-reduce of rank + 1)
WORKER = r"""
import json, os, sys
import torch, torch.distributed as dist
entry = sys.argv[1]
if entry == "setup_distributed":          # the trainer's path (config checked against the world size first)
    from neox_l2e.config import build_config
    from neox_l2e.training.engine import setup_distributed
    ps = setup_distributed(build_config(dict(num_layers=1, hidden_size=8, num_attention_heads=2, dist_timeout_s=60)))
else:                                     # the library's path
    from neox_l2e.parallel import init_distributed
    init_distributed(60)
t = torch.tensor([dist.get_rank() + 1.0])
dist.all_reduce(t)
env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
print("RESULT " + json.dumps(dict(rank=dist.get_rank(), world=dist.get_world_size(), backend=dist.get_backend(),
                                  sum=t.item(), env=env)), flush=True)
dist.destroy_process_group()
"""


def _clean_env(**extra) -> dict:
    return clean_env(**{"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", **extra})


def _launcher_env(launcher: str, rank: int, world: int) -> dict:
    return {
        "slurm": dict(SLURM_PROCID=rank, SLURM_NTASKS=world, SLURM_LOCALID=rank, SLURM_JOB_ID=1, SLURM_STEP_ID=0),
        "openmpi": dict(OMPI_COMM_WORLD_RANK=rank, OMPI_COMM_WORLD_SIZE=world, OMPI_COMM_WORLD_LOCAL_RANK=rank),
        "mvapich": dict(MV2_COMM_WORLD_RANK=rank, MV2_COMM_WORLD_SIZE=world, MV2_COMM_WORLD_LOCAL_RANK=rank),
    }[launcher]


def test_slurm_and_openmpi_ranks_form_one_world():
    """2 processes with only SLURM_* (through setup_distributed) and 2 with only OMPI_* (through
    init_distributed), plus MASTER_ADDR / MASTER_PORT: each pair is one gloo world of size 2."""
    worlds = {"slurm": ("setup_distributed", free_port()), "openmpi": ("init_distributed", free_port())}
    procs = []
    for launcher, (entry, port) in worlds.items():
        for rank in range(2):
            env = _clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **_launcher_env(launcher, rank, 2))
            procs.append(
                (
                    launcher,
                    rank,
                    subprocess.Popen(
                        [sys.executable, "-c", WORKER, entry],
                        env=env,
                        cwd=REPO,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        text=True,
                    ),
                )
            )
    results = {}
    try:
        for launcher, rank, p in procs:
            out, err = p.communicate(timeout=120)
            lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
            assert p.returncode == 0 and lines, (launcher, rank, err[-2000:])
            results[launcher, rank] = json.loads(lines[-1][len("RESULT ") :])
    finally:
        for _, _, p in procs:
            if p.poll() is None:
                p.kill()
    for (launcher, rank), r in results.items():
        assert r["world"] == 2 and r["rank"] == rank and r["backend"] == "gloo", (launcher, r)
        assert r["sum"] == 3.0, (launcher, r)  # 1 + 2: both ranks in the same world
        assert r["env"] == {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)}, (launcher, r)


def test_missing_master_addr_is_one_line():
    """A Slurm launch without MASTER_ADDR: train.py fails with one `error:` line (exit 2) naming the variable."""
    env = _clean_env(NEOX_L2E_DS_SHM="0", **_launcher_env("slurm", 0, 2))
    p = subprocess.run(
        [sys.executable, str(REPO / "train.py"), str(REPO / "configs/local/tiny.yml")],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    lines = [l for l in p.stderr.splitlines() if l.strip() and "[WARNING]" not in l]
    assert len(lines) == 1 and lines[0].startswith("error: launch: rank 0 of 2"), p.stderr
    assert "SLURM_PROCID" in lines[0] and "MASTER_ADDR is not set" in lines[0]


def test_launch_info_mapping_and_precedence():
    from neox_l2e.parallel import LaunchError, LaunchInfo, apply_launch_env, launch_info

    assert launch_info({}) == LaunchInfo(0, 1, 0, "single")
    for launcher in ("slurm", "openmpi", "mvapich"):
        assert launch_info({k: str(v) for k, v in _launcher_env(launcher, 3, 8).items()}) == LaunchInfo(
            3, 8, 3, launcher
        )
    # RANK / WORLD_SIZE (torchrun, DeepSpeed's own launch) win; mpirun inside a Slurm job: MPI wins over the
    # batch step's SLURM_PROCID=0
    both = dict(
        SLURM_PROCID="0",
        SLURM_NTASKS="4",
        SLURM_LOCALID="0",
        OMPI_COMM_WORLD_RANK="2",
        OMPI_COMM_WORLD_SIZE="4",
        OMPI_COMM_WORLD_LOCAL_RANK="0",
    )
    assert launch_info(both) == LaunchInfo(2, 4, 0, "openmpi")
    assert launch_info(dict(both, RANK="1", WORLD_SIZE="4", LOCAL_RANK="1")) == LaunchInfo(1, 4, 1, "env")
    assert launch_info(dict(both, WORLD_SIZE="1")).world_size == 1
    # SLURM_* count only under srun (SLURM_STEP_ID): python / pytest in a batch or salloc shell is one process
    batch = {k: str(v) for k, v in _launcher_env("slurm", 0, 4).items() if k != "SLURM_STEP_ID"}
    assert launch_info(batch) == LaunchInfo(0, 1, 0, "single")
    assert launch_info(dict(batch, SLURM_STEP_ID="0")) == LaunchInfo(0, 4, 0, "slurm")
    # exported for torch / DeepSpeed; MASTER_* from the config when the environment has none
    env = {k: str(v) for k, v in _launcher_env("mvapich", 1, 2).items()}
    assert apply_launch_env("node0", 29600, environ=env).rank == 1
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"], env["MASTER_PORT"]) == (
        "1",
        "2",
        "1",
        "node0",
        "29600",
    )
    env = dict(_launcher_env("openmpi", 0, 2), MASTER_ADDR="10.0.0.1")
    env = {k: str(v) for k, v in env.items()}
    apply_launch_env("node0", None, environ=env)
    assert env["MASTER_ADDR"] == "10.0.0.1" and env["MASTER_PORT"] == "29500"  # the environment wins
    with pytest.raises(LaunchError, match="OMPI_COMM_WORLD_RANK / OMPI_COMM_WORLD_SIZE.*MASTER_ADDR is not set"):
        apply_launch_env(environ={k: str(v) for k, v in _launcher_env("openmpi", 1, 2).items()})
    with pytest.raises(LaunchError, match="RANK is not set"):
        launch_info({"WORLD_SIZE": "2"})


def test_clean_env_scrubs_every_launcher():
    """The subprocess tests' environment (tests/distributed.py clean_env): no launcher variable of a Slurm / MPI
    job running the suite survives, so their processes start as one plain process (or with what they set)."""
    job = dict(
        PATH="/bin",
        RANK="3",
        WORLD_SIZE="8",
        LOCAL_RANK="3",
        LOCAL_WORLD_SIZE="8",
        MASTER_ADDR="n0",
        MASTER_PORT="1",
        SLURM_PROCID="3",
        SLURM_NTASKS="8",
        SLURM_STEP_ID="0",
        OMPI_COMM_WORLD_RANK="3",
        OMPI_COMM_WORLD_SIZE="8",
        MV2_COMM_WORLD_RANK="3",
        PMI_RANK="3",
        PMIX_RANK="3",
    )
    from neox_l2e.parallel import LaunchInfo, launch_info

    assert launch_info(job).world_size == 8
    env = clean_env(job, NEOX_L2E_DS_SHM=0)
    assert env == {"PATH": "/bin", "NEOX_L2E_DS_SHM": "0"}
    assert launch_info(env) == LaunchInfo(0, 1, 0, "single")


def _children(pid: int) -> list:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _rank_of(pid: int):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        return int(env[b"RANK"]) if b"RANK" in env else None
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_stopped_rank_ends_the_run_within_dist_timeout(tmp_path):
    """torchrun, 2 ranks, dist-timeout-s=10: SIGSTOP on rank 1 during training makes rank 0 exit non-zero within
    the timeout plus a margin (DeepSpeed's gradient all-reduce runs on a group made after set_collective_timeout:
    torch's default for groups made without timeout= would wait 30 minutes), with one line naming rank 1."""
    import signal
    import time

    import numpy as np

    from neox_l2e.data import write_indexed_dataset

    rng = np.random.default_rng(0)
    prefix = write_indexed_dataset(
        str(tmp_path / "tok"), [list(rng.integers(1, 64, 40)) + [0] for _ in range(200)], vocab_size=64
    )
    timeout = 10
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(REPO / "train.py"),
        str(REPO / "configs/local/tiny.yml"),
        f"train-data-paths=[{prefix}]",
        f"valid-data-paths=[{prefix}]",
        "train-iters=100000",
        "lr-decay-iters=100000",
        "eval-interval=100000",
        f"log-dir={tmp_path / 'run'}",
        f"dist-timeout-s={timeout}",
        "zero_optimization={stage: 1}",
    ]
    p = subprocess.Popen(
        cmd,
        env=_clean_env(NEOX_L2E_DS_SHM="0"),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    ranks = {}
    try:
        metrics = tmp_path / "run" / "metrics.jsonl"
        deadline = time.time() + 150
        while time.time() < deadline and not (metrics.exists() and metrics.read_text().count('"train"') >= 3):
            assert p.poll() is None, p.stdout.read()[-3000:]
            time.sleep(0.2)
        assert metrics.exists(), "training did not start"
        ranks = {_rank_of(c): c for c in _children(p.pid)}
        assert set(ranks) == {0, 1}, ranks
        os.kill(ranks[1], signal.SIGSTOP)
        t0 = time.time()
        while _alive(ranks[0]) and time.time() - t0 < timeout + 40:
            time.sleep(0.1)
        took = time.time() - t0
        assert not _alive(ranks[0]), f"rank 0 still running {took:.0f} s after rank 1 stopped (timeout {timeout} s)"
        assert took < timeout + 25, took
        os.kill(ranks[1], signal.SIGKILL)
        out, _ = p.communicate(timeout=60)
    finally:
        for pid in ranks.values():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode != 0
    errors = [l for l in out.splitlines() if l.startswith("error: ")]
    assert len(errors) == 1, out[-3000:]
    assert errors[0].startswith("error: [rank 0] a collective failed: rank 1 stopped answering"), errors[0]
    assert f"dist-timeout-s={timeout}" in errors[0], errors[0]


def test_non_positive_dist_timeout_is_one_line_in_a_one_process_run(tmp_path):
    """dist-timeout-s <= 0 is refused before any process group is made (it used to surface as a store timeout
    reported as "another rank probably died" in a run that has no other rank)."""
    import numpy as np

    from neox_l2e.data import write_indexed_dataset

    rng = np.random.default_rng(0)
    prefix = write_indexed_dataset(
        str(tmp_path / "tok"), [list(rng.integers(1, 64, 40)) + [0] for _ in range(50)], vocab_size=64
    )
    p = subprocess.run(
        [
            sys.executable,
            str(REPO / "train.py"),
            str(REPO / "configs/local/tiny.yml"),
            f"train-data-paths=[{prefix}]",
            f"log-dir={tmp_path / 'run'}",
            "dist-timeout-s=0",
        ],
        env=_clean_env(NEOX_L2E_DS_SHM="0"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [l for l in p.stderr.splitlines() if l.strip() and "[WARNING]" not in l]
    assert p.returncode == 2 and len(lines) == 1, p.stderr[-2000:]
    # the config's own check (if any) may word it differently: one line naming the key, blaming no other rank
    assert lines[0].startswith("error: ") and "dist-timeout-s" in lines[0] and "another rank" not in lines[0], lines[0]
