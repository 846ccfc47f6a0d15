"""DeepSpeed engine setup: process group, optimizer (AdamW), the DeepSpeed config dict, the engine.

    ps = setup_distributed(cfg)                         # gloo on CPU, NCCL on GPU; dist-timeout-s
    model = GPTNeoX(cfg, ps, vocab_size, seed=cfg.training.seed)
    engine, optimizer = build_engine(cfg, model, ps)    # ZeRO 0-3, fp32 / fp16 / bf16, clipping, gas

The optimizer is always a client ``torch.optim.AdamW`` (fused on CUDA, plain on CPU): no DeepSpeed op
has to be compiled. NeoX's "Adam" with weight decay is AdamW; biases and norm weights get no decay.
"""

from __future__ import annotations

import datetime
import logging
import os

import torch
import torch.distributed as dist

from ..config import ConfigError, NeoXConfig
from ..model.param_groups import param_groups
from ..parallel import (
    ParallelState,
    default_backend,
    default_device,
    init_distributed,
    launch_info,
    set_collective_timeout,
)

# DeepSpeed's shared-memory all-reduce op for CPU ranks must be JIT-compiled (about a minute the first
# time). It only speeds up large CPU all-reduces; gloo works without it. Off unless this is "1".
SHM_ENV = "NEOX_L2E_DS_SHM"

FP16_KEYS = (
    "enabled",
    "loss_scale",
    "initial_scale_power",
    "loss_scale_window",
    "hysteresis",
    "min_loss_scale",
    "consecutive_hysteresis",
    "auto_cast",
)


def world_size_from_env() -> int:
    """The world size the launcher set up (torchrun / DeepSpeed's RANK and WORLD_SIZE, or srun's / mpirun's own
    variables: neox_l2e.parallel.launch_info)."""
    return launch_info().world_size


def setup_distributed(cfg: NeoXConfig) -> ParallelState:
    """Initialise the default process group (also for one process: DeepSpeed needs one) and the TP/DP groups.

    The world size is checked against the config first, so a bad launch fails with one ConfigError line.
    Ranks started by srun / mpirun (DeepSpeed's slurm, openmpi, mvapich runners) are mapped by
    init_distributed; their rendezvous address is MASTER_ADDR / MASTER_PORT, else the config's master-addr /
    master-port.
    """
    world = dist.get_world_size() if dist.is_initialized() else world_size_from_env()
    cfg.check_world_size(world)
    timeout = set_collective_timeout(cfg.training.dist_timeout_s).total_seconds()  # refuses <= 0 in one line
    if not dist.is_initialized():
        if world > 1:
            init_distributed(timeout, master_addr=cfg.parallel.master_addr, master_port=cfg.parallel.master_port)
        else:
            # one process: its own store on the loopback, on a port the OS picks while binding (no probe-then-bind
            # race with other jobs, and an inherited MASTER_PORT, e.g. a parent run's, cannot collide); MASTER_*
            # then name it for DeepSpeed and anything else that reads them
            store = dist.TCPStore(
                "127.0.0.1", 0, world_size=1, is_master=True, timeout=datetime.timedelta(seconds=timeout)
            )
            os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(store.port)
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("LOCAL_RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
            if default_backend() == "nccl":
                torch.cuda.set_device(default_device())
            dist.init_process_group(
                backend=default_backend(),
                store=store,
                rank=0,
                world_size=1,
                timeout=datetime.timedelta(seconds=timeout),
            )
    return ParallelState.from_distributed(cfg.tp, default_device(), timeout_s=timeout)


def build_optimizer(model: torch.nn.Module, cfg: NeoXConfig, device: torch.device) -> torch.optim.Optimizer:
    params = (cfg.optimizer.optimizer or {}).get("params") or {}
    betas = tuple(params.get("betas", (0.9, 0.999)))
    eps = float(params.get("eps", 1e-8))
    zero = cfg.parallel.zero_optimization or {}
    offload = (zero.get("offload_optimizer") or {}).get("device", "none") not in (None, "none") or zero.get(
        "cpu_offload"
    )
    kwargs = {}
    if device.type == "cuda" and not offload:
        kwargs["fused"] = True
    return torch.optim.AdamW(param_groups(model, cfg.optimizer.weight_decay), lr=cfg.lr, betas=betas, eps=eps, **kwargs)


def deepspeed_config(cfg: NeoXConfig, dp: int) -> dict:
    """The DeepSpeed config dict for this run (batch, gas, clipping, ZeRO, precision)."""
    t = cfg.training
    zero = {k: v for k, v in dict(cfg.parallel.zero_optimization or {"stage": 0}).items() if k != "cpu_offload"}
    if (cfg.parallel.zero_optimization or {}).get("cpu_offload"):
        zero.setdefault("offload_optimizer", {"device": "cpu"})
    ds = {
        "train_micro_batch_size_per_gpu": t.train_micro_batch_size_per_gpu,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train_batch_size": t.train_micro_batch_size_per_gpu * t.gradient_accumulation_steps * dp,
        "gradient_clipping": cfg.optimizer.gradient_clipping,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": bool(cfg.optimizer.zero_allow_untested_optimizer),
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": cfg.logging.steps_per_print if cfg.logging.wall_clock_breakdown else 10**9,
        "wall_clock_breakdown": cfg.logging.wall_clock_breakdown,
    }
    prec = cfg.precision_name
    if prec == "fp16":
        block = {k: v for k, v in (cfg.precision.fp16 or {}).items() if k in FP16_KEYS}
        block["enabled"] = True
        block.setdefault("loss_scale", 0)
        ds["fp16"] = block
    elif prec == "bfloat16":
        ds["bf16"] = {"enabled": True}
    if cfg.precision.fp32_allreduce and prec != "fp32":
        ds["communication_data_type"] = "fp32"
    return ds


def _quiet_deepspeed(verbose: bool) -> None:
    try:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.INFO if verbose else logging.WARNING)
    except ImportError:  # pragma: no cover
        pass


def _maybe_disable_shm_op(ps: ParallelState) -> None:
    if ps.device.type != "cpu" or os.environ.get(SHM_ENV, "0") == "1":
        return
    import importlib

    # (`import deepspeed.comm.torch as m` would give the torch package: deepspeed.comm imports torch)
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    ds_torch.build_shm_op = lambda: None


def build_engine(cfg: NeoXConfig, model: torch.nn.Module, ps: ParallelState):
    """deepspeed.initialize with a client AdamW; returns (engine, base torch optimizer)."""
    import deepspeed

    _quiet_deepspeed(cfg.logging.wall_clock_breakdown)
    _maybe_disable_shm_op(ps)
    from deepspeed.accelerator import get_accelerator

    if cfg.precision_name == "fp16" and not get_accelerator().is_fp16_supported():
        raise ConfigError(
            f"{cfg.source_of('fp16')}: fp16 training needs a GPU (DeepSpeed's CPU accelerator has no "
            "fp16 support); use bf16 or fp32 there"
        )
    optimizer = build_optimizer(model, cfg, ps.device)
    kwargs = {}
    if ps.tp > 1:
        kwargs["mpu"] = ps
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg, ps.dp), dist_init_required=False, **kwargs
    )
    if cfg.compile_mode is not None:
        compile_engine(engine, cfg)
    return engine, optimizer


def compile_engine(engine, cfg: NeoXConfig) -> None:
    """model.compile: torch.compile the module's forward in place (DeepSpeed's engine.compile, nn.Module.compile
    underneath), so the module keeps its class, attributes and state_dict keys (checkpoints are the same) and
    ZeRO 1/2 hooks, which live on the parameters and the engine, are untouched. The compile happens at the first
    forward. An inhibited layer's up-projection (the L2E inhibitor: its Python-side state and, on CUDA, the
    fused kernel) runs eagerly: a graph break there (neox_l2e.model.mlp)."""
    mode = cfg.compile_mode
    kwargs = {} if mode == "default" else {"mode": mode}
    engine.compile(backend=cfg.model.compile_backend, compile_kwargs=kwargs)


# DeepSpeed's global wall-clock timers (wall-clock-breakdown: true) under GPT-NeoX's timer names
WALL_CLOCK_TIMERS = {
    "fwd": "forward",
    "bwd": "backward",
    "bwd_inner": "backward-backward",
    "bwd_allreduce": "backward-allreduce",
    "step": "optimizer",
}


def wall_clock_timings(engine) -> dict:
    """The last optimizer step's wall-clock breakdown in ms ({"timers/forward": ..., ...}; forward and backward
    summed over its micro-batches), read from DeepSpeed's timers; empty unless wall-clock-breakdown is on."""
    if not engine.wall_clock_breakdown():
        return {}
    cache = engine.get_wall_clock_timers() or {}
    return {f"timers/{neox}": float(cache[ds]) for ds, neox in WALL_CLOCK_TIMERS.items() if ds in cache}
