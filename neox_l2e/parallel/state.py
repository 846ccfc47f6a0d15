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


def init_distributed(timeout_s: int = 300) -> None:
    """Initialise torch.distributed from the launcher's environment (RANK, WORLD_SIZE, MASTER_*)."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    backend = default_backend()
    if backend == "nccl":
        torch.cuda.set_device(default_device())
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
