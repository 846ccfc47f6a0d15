"""The parallel state: who this rank is and which groups it talks to. Passed to what needs it.

Rank layout (as Megatron/NeoX): tensor-parallel groups are runs of consecutive ranks,
data-parallel groups stride by the TP degree. With world size 4 and TP 2:
    TP groups [0, 1] [2, 3];  DP groups [0, 2] [1, 3].
A single process (no torch.distributed) is ParallelState.single(): every collective is a no-op.
"""
from __future__ import annotations

import datetime
import hashlib
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from ..errors import LaunchError
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
    rng: Optional[RNGTracker] = None       # dropout streams (neox_l2e.parallel.random); seeded by the model

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
    def from_distributed(cls, tp: int = 1, device: Optional[torch.device] = None,
                         seed: Optional[int] = None) -> "ParallelState":
        """Build the TP and DP groups of an initialised default process group (every rank must call it).
        With ``seed`` the dropout RNG streams are seeded too (else the model seeds them from its config)."""
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
        tp_group = dp_group = None
        my_tp, my_dp = (rank,), (rank,)
        # every rank must create every group, in the same order
        for i in range(dp):
            ranks = tuple(range(i * tp, (i + 1) * tp))
            g = dist.new_group(list(ranks))
            if rank in ranks:
                tp_group, my_tp = g, ranks
        for j in range(tp):
            ranks = tuple(range(j, world, tp))
            g = dist.new_group(list(ranks))
            if rank in ranks:
                dp_group, my_dp = g, ranks
        if device is None:
            device = default_device()
        ps = cls(world_size=world, rank=rank, tp=tp, tp_rank=rank % tp, dp=dp, dp_rank=rank // tp,
                 device=torch.device(device), tp_group=tp_group, dp_group=dp_group,
                 tp_ranks=my_tp, dp_ranks=my_dp)
        if seed is not None:
            ps.rng.seed(seed, ps.tp_rank)
        return ps

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

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

    def all_reduce_world(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(t, op=op)
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
        digest = torch.tensor([int.from_bytes(hashlib.sha1(state.cpu().numpy().tobytes()).digest()[:7],
                                              "little")], dtype=torch.int64, device=self.device)
        lo, hi = digest.clone(), digest.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=self.tp_group)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=self.tp_group)
        if lo.item() != hi.item():
            raise RuntimeError(f"rank {self.rank}: torch's default RNG differs across the tensor-parallel group "
                               f"{list(self.tp_ranks)}; seed it with the same value on every rank before training")

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
DEFAULT_MASTER_PORT = 29500      # torch's and DeepSpeed's default rendezvous port


@dataclass(frozen=True)
class LaunchInfo:
    """This process's place in the launch, read from the environment (see launch_info)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    source: str = "single"       # "env" (RANK / WORLD_SIZE), "openmpi", "mvapich", "slurm" or "single"


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
            raise LaunchError(f"launch: {missing} is not set but {'WORLD_SIZE' if missing == 'RANK' else 'RANK'} is; "
                              "the launcher must set both (torchrun and deepy.py do)")
        local = _int_var(env, "LOCAL_RANK", "env") if "LOCAL_RANK" in env else 0
        return LaunchInfo(_int_var(env, "RANK", "env"), world, local, "env")
    for name, rank_var, size_var, local_var in LAUNCHER_VARIABLES:
        if name == "slurm" and "SLURM_STEP_ID" not in env:
            continue                     # not under srun: the batch / salloc shell's SLURM_* describe the allocation
        if rank_var in env and size_var in env:
            local = _int_var(env, local_var, name) if local_var in env else 0
            return LaunchInfo(_int_var(env, rank_var, name), _int_var(env, size_var, name), local, name)
    return LaunchInfo()


def apply_launch_env(master_addr: Optional[str] = None, master_port: Optional[int] = None,
                     environ=None) -> LaunchInfo:
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
            raise LaunchError(f"launch: rank {info.rank} of {info.world_size} (from {_source_vars(info.source)}) but "
                              "MASTER_ADDR is not set (DeepSpeed's slurm, openmpi and mvapich runners do not export "
                              "it); export MASTER_ADDR (the host of rank 0) and MASTER_PORT, or set master-addr in "
                              "the config")
        env["MASTER_ADDR"] = str(master_addr)
    if not env.get("MASTER_PORT"):
        env["MASTER_PORT"] = str(master_port or DEFAULT_MASTER_PORT)
    env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = str(info.rank), str(info.world_size), str(info.local_rank)
    return info


def init_distributed(timeout_s: int = 300, master_addr: Optional[str] = None,
                     master_port: Optional[int] = None) -> LaunchInfo:
    """Initialise torch.distributed from the launcher's environment (apply_launch_env: torchrun's or DeepSpeed's
    RANK / WORLD_SIZE / MASTER_*, or srun's / mpirun's own variables). One process: nothing to do."""
    info = apply_launch_env(master_addr, master_port)
    if dist.is_initialized() or info.world_size <= 1:
        return info
    backend = default_backend()
    if backend == "nccl":
        torch.cuda.set_device(default_device())
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return info
