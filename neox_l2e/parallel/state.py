"""The parallel state: who this rank is and which groups it talks to. Passed to what needs it.

Rank layout (as Megatron/NeoX): tensor-parallel groups are runs of consecutive ranks,
data-parallel groups stride by the TP degree. With world size 4 and TP 2:
    TP groups [0, 1] [2, 3];  DP groups [0, 2] [1, 3].
A single process (no torch.distributed) is ParallelState.single(): every collective is a no-op.

Timeouts: every process group, ours and DeepSpeed's, waits at most ``dist-timeout-s`` in a collective
(set_collective_timeout: torch's own default for groups made without ``timeout=`` is 30 minutes). A
heartbeat thread per rank (start_heartbeat) lets a rank whose collective timed out name the rank that
stopped answering (collective_failure_message).
"""

from __future__ import annotations

import datetime
import hashlib
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from ..errors import ConfigError, LaunchError
from .random import RNGTracker


@dataclass
class ParallelState:
    world_size: int = 1
    rank: int = 0
    tp: int = 1
    tp_rank: int = 0
    dp: int = 1
    dp_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    tp_group: Optional[object] = None
    dp_group: Optional[object] = None
    tp_ranks: tuple = (0,)
    dp_ranks: tuple = (0,)
    rng: Optional[RNGTracker] = None  # dropout streams (neox_l2e.parallel.random); seeded by the model

    def __post_init__(self):
        self.device = torch.device(self.device)
        if self.tp < 1 or not 0 <= self.tp_rank < self.tp:
            raise ValueError(f"bad tensor-parallel layout: tp={self.tp}, tp_rank={self.tp_rank}")
        if self.rng is None:
            self.rng = RNGTracker(self.device)

    @classmethod
    def single(cls, device: Optional[torch.device] = None) -> "ParallelState":
        return cls(device=torch.device(device) if device is not None else torch.device("cpu"))

    @classmethod
    def layout(cls, tp: int, tp_rank: int = 0, device="meta") -> "ParallelState":
        """A process-group-free state describing one TP rank (meta-device models for checkpoint tools).
        Its collectives must not be called."""
        return cls(tp=tp, tp_rank=tp_rank, device=torch.device(device))

    @classmethod
    def from_distributed(
        cls,
        tp: int = 1,
        device: Optional[torch.device] = None,
        seed: Optional[int] = None,
        timeout_s: Optional[float] = None,
    ) -> "ParallelState":
        """Build the TP and DP groups of an initialised default process group (every rank must call it).
        With ``seed`` the dropout RNG streams are seeded too (else the model seeds them from its config).
        ``timeout_s`` (dist-timeout-s) bounds every collective on these groups and on groups made later
        without a timeout (DeepSpeed's); default: the value set by init_distributed / set_collective_timeout.
        With more than one rank it also starts this rank's heartbeat (start_heartbeat)."""
        if timeout_s is not None:
            set_collective_timeout(timeout_s)
        if not dist.is_initialized():
            if tp != 1:
                raise ValueError(f"model-parallel-size {tp} needs torch.distributed with {tp} or more ranks")
            ps = cls.single(device)
            if seed is not None:
                ps.rng.seed(seed, 0)
            return ps
        world, rank = dist.get_world_size(), dist.get_rank()
        if world % tp:
            raise ValueError(f"model-parallel-size {tp} does not divide the world size {world}")
        dp = world // tp
        timeout = collective_timeout()
        tp_group = dp_group = None
        my_tp, my_dp = (rank,), (rank,)
        # every rank must create every group, in the same order
        for i in range(dp):
            ranks = tuple(range(i * tp, (i + 1) * tp))
            g = dist.new_group(list(ranks), timeout=timeout)
            if rank in ranks:
                tp_group, my_tp = g, ranks
        for j in range(tp):
            ranks = tuple(range(j, world, tp))
            g = dist.new_group(list(ranks), timeout=timeout)
            if rank in ranks:
                dp_group, my_dp = g, ranks
        if device is None:
            device = default_device()
        ps = cls(
            world_size=world,
            rank=rank,
            tp=tp,
            tp_rank=rank % tp,
            dp=dp,
            dp_rank=rank // tp,
            device=torch.device(device),
            tp_group=tp_group,
            dp_group=dp_group,
            tp_ranks=my_tp,
            dp_ranks=my_dp,
        )
        if seed is not None:
            ps.rng.seed(seed, ps.tp_rank)
        if world > 1:
            start_heartbeat()
        return ps

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- small collectives used outside autograd (statistics, metrics) ----
    def all_reduce_tp(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if self.tp > 1:
            dist.all_reduce(t, op=op, group=self.tp_group)
        return t

    def all_reduce_dp(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if self.dp > 1:
            dist.all_reduce(t, op=op, group=self.dp_group)
        return t

    def all_gather_dp(self, t: torch.Tensor) -> list:
        """The tensor from every data-parallel rank, in DP-rank order (deterministic merges)."""
        if self.dp == 1:
            return [t]
        out = [torch.empty_like(t) for _ in range(self.dp)]
        dist.all_gather(out, t.contiguous(), group=self.dp_group)
        return out

    # ---- DeepSpeed's `mpu` protocol (engine = deepspeed.initialize(..., mpu=ps)) ----
    # DeepSpeed reduces gradients over get_data_parallel_group(), partitions ZeRO-1/2 state over it,
    # and sums gradient norms over get_model_parallel_group(), counting parameters not marked
    # `tensor_model_parallel` on model-parallel rank 0 only (layers.mark_tp_param sets the marks).
    def get_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.tp

    def get_model_parallel_group(self):
        return self.tp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.tp_ranks[0]

    def get_pipe_parallel_rank(self) -> int:
        return 0

    def get_pipe_parallel_world_size(self) -> int:
        return 1

    def get_data_parallel_group_ranks(self) -> list:
        return list(self.dp_ranks)

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp

    def get_data_parallel_group(self):
        return self.dp_group

    def check_shared_rng(self) -> None:
        """Raise if torch's default generator (the shared dropout stream) differs between the ranks of this
        TP group: hidden dropout would then drop different elements of replicated activations."""
        if self.tp == 1:
            return
        state = self.rng._get_default() if self.device.type != "meta" else torch.zeros(1, dtype=torch.uint8)
        digest = torch.tensor(
            [int.from_bytes(hashlib.sha1(state.cpu().numpy().tobytes()).digest()[:7], "little")],
            dtype=torch.int64,
            device=self.device,
        )
        lo, hi = digest.clone(), digest.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=self.tp_group)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=self.tp_group)
        if lo.item() != hi.item():
            raise RuntimeError(
                f"rank {self.rank}: torch's default RNG differs across the tensor-parallel group "
                f"{list(self.tp_ranks)}; seed it with the same value on every rank before training"
            )

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()


def default_device() -> torch.device:
    """CUDA device of this local rank when there is a GPU, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


def default_backend() -> str:
    """NCCL on GPU, gloo on CPU: chosen by device, whatever the config's distributed-backend says."""
    return "nccl" if torch.cuda.is_available() else "gloo"


# Launchers that start the ranks without torchrun's variables: DeepSpeed's openmpi / mvapich runners
# (mpirun) and its slurm runner (srun) pass only their own rank variables, and none of them exports
# MASTER_ADDR / MASTER_PORT (the pdsh, mpich and impi runners and torchrun set RANK / WORLD_SIZE /
# LOCAL_RANK / MASTER_* themselves). MPI first: mpirun inside a Slurm job also inherits SLURM_PROCID=0.
LAUNCHER_VARIABLES = (
    # name, rank, world size, local rank
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("mvapich", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK"),
    ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
)
DEFAULT_MASTER_PORT = 29500  # torch's and DeepSpeed's default rendezvous port


@dataclass(frozen=True)
class LaunchInfo:
    """This process's place in the launch, read from the environment (see launch_info)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    source: str = "single"  # "env" (RANK / WORLD_SIZE), "openmpi", "mvapich", "slurm" or "single"


def _source_vars(source: str) -> str:
    for name, rank_var, size_var, _ in LAUNCHER_VARIABLES:
        if name == source:
            return f"{rank_var} / {size_var}"
    return "RANK / WORLD_SIZE"


def _int_var(environ, name: str, source: str) -> int:
    value = environ[name]
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"launch ({source}): {name}={value!r} is not an integer") from None


def launch_info(environ=None) -> LaunchInfo:
    """Rank, world size and local rank of this process, from whichever launcher started it (no side effects).

    RANK / WORLD_SIZE (torchrun, DeepSpeed's local / pdsh / mpich / impi launches) win; else OpenMPI's
    OMPI_COMM_WORLD_*, MVAPICH's MV2_COMM_WORLD_*, Slurm's SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, the
    latter only in a job step started by srun (SLURM_STEP_ID set): a plain ``python train.py`` or pytest in a
    batch script or salloc shell of a multi-task allocation also sees SLURM_NTASKS > 1, and is one process.
    Nothing set (or WORLD_SIZE=1): one process."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env or "RANK" in env:
        world = _int_var(env, "WORLD_SIZE", "env") if "WORLD_SIZE" in env else None
        if world == 1:
            return LaunchInfo(source="env")
        if world is None or "RANK" not in env:
            missing = "RANK" if "RANK" not in env else "WORLD_SIZE"
            raise LaunchError(
                f"launch: {missing} is not set but {'WORLD_SIZE' if missing == 'RANK' else 'RANK'} is; "
                "the launcher must set both (torchrun and deepy.py do)"
            )
        local = _int_var(env, "LOCAL_RANK", "env") if "LOCAL_RANK" in env else 0
        return LaunchInfo(_int_var(env, "RANK", "env"), world, local, "env")
    for name, rank_var, size_var, local_var in LAUNCHER_VARIABLES:
        if name == "slurm" and "SLURM_STEP_ID" not in env:
            continue  # not under srun: the batch / salloc shell's SLURM_* describe the allocation
        if rank_var in env and size_var in env:
            local = _int_var(env, local_var, name) if local_var in env else 0
            return LaunchInfo(_int_var(env, rank_var, name), _int_var(env, size_var, name), local, name)
    return LaunchInfo()


def apply_launch_env(master_addr: Optional[str] = None, master_port: Optional[int] = None, environ=None) -> LaunchInfo:
    """Resolve launch_info() and export it as RANK / WORLD_SIZE / LOCAL_RANK (what torch's env:// rendezvous,
    DeepSpeed and default_device() read). For a multi-process launch, MASTER_ADDR / MASTER_PORT come from the
    environment, else from ``master_addr`` / ``master_port`` (the config's master-addr / master-port);
    without an address it raises a one-line LaunchError. The one place that maps launcher variables: used by
    init_distributed() and by the training engine's setup_distributed()."""
    env = os.environ if environ is None else environ
    info = launch_info(env)
    if info.world_size <= 1:
        return info
    if not 0 <= info.rank < info.world_size:
        raise LaunchError(f"launch ({info.source}): rank {info.rank} is outside the world size {info.world_size}")
    if not env.get("MASTER_ADDR"):
        if not master_addr:
            raise LaunchError(
                f"launch: rank {info.rank} of {info.world_size} (from {_source_vars(info.source)}) but "
                "MASTER_ADDR is not set (DeepSpeed's slurm, openmpi and mvapich runners do not export "
                "it); export MASTER_ADDR (the host of rank 0) and MASTER_PORT, or set master-addr in "
                "the config"
            )
        env["MASTER_ADDR"] = str(master_addr)
    if not env.get("MASTER_PORT"):
        env["MASTER_PORT"] = str(master_port or DEFAULT_MASTER_PORT)
    env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = str(info.rank), str(info.world_size), str(info.local_rank)
    return info


def init_distributed(
    timeout_s: int = 300, master_addr: Optional[str] = None, master_port: Optional[int] = None
) -> LaunchInfo:
    """Initialise torch.distributed from the launcher's environment (apply_launch_env: torchrun's or DeepSpeed's
    RANK / WORLD_SIZE / MASTER_*, or srun's / mpirun's own variables). One process: nothing to do.
    ``timeout_s`` (dist-timeout-s) bounds every collective: the default group's and, through
    set_collective_timeout, every group made later (ParallelState.from_distributed's, DeepSpeed's)."""
    set_collective_timeout(timeout_s)
    info = apply_launch_env(master_addr, master_port)
    if dist.is_initialized() or info.world_size <= 1:
        return info
    backend = default_backend()
    if backend == "nccl":
        torch.cuda.set_device(default_device())
    dist.init_process_group(backend=backend, timeout=collective_timeout())
    return info


# ---- timeouts and the heartbeat ---------------------------------------------------------------------------------

_TIMEOUT: Optional[datetime.timedelta] = None  # set by set_collective_timeout


def set_collective_timeout(timeout_s: float) -> datetime.timedelta:
    """Make ``timeout_s`` (dist-timeout-s) the longest any collective waits: for the groups this module makes, and
    as torch's default for every group made later without ``timeout=`` (DeepSpeed's clone of the world group, its
    ZeRO / expert groups), which would otherwise wait torch's 30-minute default. gloo applies the timeout to each
    operation; NCCL through its watchdog (TORCH_NCCL_ASYNC_ERROR_HANDLING, set by train.py). Raises a one-line
    ConfigError for a value that is not a positive finite number of seconds."""
    global _TIMEOUT
    try:
        seconds = float(timeout_s)
    except (TypeError, ValueError):
        seconds = float("nan")
    if isinstance(timeout_s, bool) or not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(
            f"dist-timeout-s {timeout_s!r}: must be a positive number of seconds (how long a "
            "collective may wait for the other ranks)"
        )
    _TIMEOUT = datetime.timedelta(seconds=seconds)
    from torch.distributed import distributed_c10d as c10d

    # torch reads these module defaults at each new_group() without timeout= (c10d._get_default_timeout)
    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
        if isinstance(getattr(c10d, name, None), datetime.timedelta):
            setattr(c10d, name, _TIMEOUT)
    return _TIMEOUT


def collective_timeout() -> Optional[datetime.timedelta]:
    """The timeout set by set_collective_timeout (None: not set; torch's defaults apply)."""
    return _TIMEOUT


HEARTBEAT_PREFIX = "neox_l2e/heartbeat/"
GAVE_UP_PREFIX = "neox_l2e/gave_up/"


class _Heartbeat:
    """A daemon thread that adds 1 to this rank's counter in the rendezvous store every ``period`` seconds. A
    stopped (SIGSTOP) or dead process stops counting; a rank blocked in a collective keeps counting (the
    collective releases the GIL), so a survivor can tell which rank stopped answering (silent_ranks)."""

    def __init__(self, store, rank: int, world: int, period: float):
        self.store, self.rank, self.world, self.period = store, rank, world, period
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="neox-l2e-heartbeat", daemon=True)
        self.thread.start()

    def _run(self):
        key = f"{HEARTBEAT_PREFIX}{self.rank}"
        while not self.stop.is_set():
            try:
                if not dist.is_initialized():
                    return
                self.store.add(key, 1)
            except Exception:  # noqa: BLE001 - the store is gone (shutdown, a dead store host): stop beating
                return
            self.stop.wait(self.period)

    def counts(self, timeout_s: float) -> list:
        """Every rank's heartbeat count (-1 where it has none), read with a store timeout of ``timeout_s``."""
        self.store.set_timeout(datetime.timedelta(seconds=timeout_s))
        return [self.store.add(f"{HEARTBEAT_PREFIX}{r}", 0) for r in range(self.world)]


_HEARTBEAT: Optional[_Heartbeat] = None


def heartbeat_period() -> float:
    """Seconds between two heartbeats: a tenth of dist-timeout-s, between 0.5 and 5."""
    t = _TIMEOUT.total_seconds() if _TIMEOUT is not None else 300.0
    return min(5.0, max(0.5, t / 10))


def start_heartbeat() -> bool:
    """Start (or restart, after a new default process group) this rank's heartbeat in the default group's store.
    False when there is no multi-rank process group or torch exposes no store (then no rank can be named)."""
    global _HEARTBEAT
    if not dist.is_initialized() or dist.get_world_size() <= 1:
        return False
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        store = _get_default_store()
    except Exception:  # noqa: BLE001 - a torch without it, or a group without a store
        return False
    if _HEARTBEAT is not None:
        if _HEARTBEAT.store is store and _HEARTBEAT.thread.is_alive():
            return True
        _HEARTBEAT.stop.set()
    _HEARTBEAT = _Heartbeat(store, dist.get_rank(), dist.get_world_size(), heartbeat_period())
    return True


def silent_ranks() -> Optional[list]:
    """The ranks whose heartbeat stopped: this rank marks itself as giving up, reads every counter, waits a little
    over two heartbeat periods and reads again; a rank whose counter did not move and that did not give up itself
    is not answering. None when unknowable (no heartbeat); [0] when the store itself does not answer and rank 0
    hosts it (a plain env:// launch: its process is stopped or dead)."""
    hb = _HEARTBEAT
    if hb is None:
        return None
    hb.stop.set()
    wait = 2.2 * hb.period
    try:
        hb.store.set_timeout(datetime.timedelta(seconds=wait + 5))
        hb.store.set(f"{GAVE_UP_PREFIX}{hb.rank}", "1")
        before = hb.counts(wait + 5)
        time.sleep(wait)
        after = hb.counts(wait + 5)
        gave_up = set(r for r in range(hb.world) if hb.store.check([f"{GAVE_UP_PREFIX}{r}"]))
    except Exception:  # noqa: BLE001 - the store does not answer
        return [0] if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true" and hb.rank != 0 else None
    return [r for r in range(hb.world) if r != hb.rank and after[r] == before[r] and r not in gave_up]


def is_collective_failure(e: BaseException) -> bool:
    """Whether ``e`` is a collective that failed or timed out (gloo / NCCL / torch.distributed's errors)."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    return any(
        s in text
        for s in ("Connection closed by peer", "Connection reset by peer", "timed out", "Timed out", "NCCL", "gloo")
    )


def collective_failure_message(e: BaseException, rank: Optional[int] = None, world_size: Optional[int] = None) -> str:
    """One line for a failed collective: which rank gave up, after how long, and which rank stopped answering when
    the heartbeat tells (silent_ranks; this waits about two heartbeat periods). In a one-process run no other rank
    exists, so the line says so instead of blaming one."""
    if rank is None:
        rank = dist.get_rank() if dist.is_initialized() else 0
    if world_size is None:
        world_size = dist.get_world_size() if dist.is_initialized() else launch_info().world_size
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    limit = f"dist-timeout-s={_TIMEOUT.total_seconds():g}" if _TIMEOUT is not None else "dist-timeout-s"
    if world_size <= 1:
        return f"[rank {rank}] a collective failed in a one-process run ({limit}): {first}"
    silent = silent_ranks()
    if silent:
        who = (
            f"rank {silent[0]} stopped answering"
            if len(silent) == 1
            else f"ranks {', '.join(map(str, silent))} stopped answering"
        )
        return (
            f"[rank {rank}] a collective failed: {who} (no heartbeat: stopped, hung outside a collective or "
            f"dead; {limit} bounds the wait); see its log: {first}"
        )
    return (
        f"[rank {rank}] a collective failed, another rank died or hung ({limit} bounds the wait); see the other "
        f"ranks' logs: {first}"
    )
