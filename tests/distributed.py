"""Run a function on N gloo ranks in spawned processes (CPU), for distributed tests.

    def _worker(rank, world, tmp):          # module-level, so it pickles
        ...                                  # torch.distributed is initialised (gloo)
        return something_picklable           # collected per rank

    results = run_ranks(_worker, world=2, args=(tmp_path,))

clean_env(**extra): this environment without any launcher's variables (RANK / WORLD_SIZE / MASTER_*, SLURM_*,
OMPI_*, MV2_*, PMI_*), for subprocesses that must start as one plain process, or with only the variables given,
even when the suite itself runs inside a Slurm / MPI job.
"""

from __future__ import annotations

import os
import socket
import traceback

import torch.multiprocessing as mp

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
LAUNCH_PREFIXES = ("SLURM_", "OMPI_", "MV2_", "PMI_", "PMIX_")


def is_launch_var(name: str) -> bool:
    return name in LAUNCH_VARS or name.startswith(LAUNCH_PREFIXES)


def clean_env(environ=None, **extra) -> dict:
    """A copy of ``environ`` (default: os.environ) without launcher variables, plus ``extra`` (as strings)."""
    env = {k: v for k, v in (os.environ if environ is None else environ).items() if not is_launch_var(k)}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, fn, world, port, args, queue):
    for k in [k for k in os.environ if is_launch_var(k)]:  # inherited from a Slurm / MPI job running the suite
        del os.environ[k]
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
        out = fn(rank, world, *args)
        queue.put((rank, "ok", out))
    except BaseException:  # noqa: BLE001 - reported to the test
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass


def run_ranks(fn, world: int = 2, args: tuple = (), timeout: float = 300.0) -> list:
    """Spawn ``world`` processes running fn(rank, world, *args); return their results in rank order."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, fn, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world):
            rank, status, payload = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = payload
            else:
                errors.append(f"rank {rank}:\n{payload}")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("distributed worker failed\n" + "\n".join(errors))
    return [results[r] for r in range(world)]
