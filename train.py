#!/usr/bin/env python
"""Train a Pythia / GPT-NeoX model (with L2E when configured) from NeoX yml configs.

    python train.py configs/local/demo.yml                                   # one process (CPU or one GPU)
    torchrun --standalone --nproc_per_node 2 train.py CONFIG.yml [...]       # several ranks on one node
    python deepy.py train.py CONFIG.yml [...]                                # NeoX-style (DeepSpeed launcher)

Extra ``key=value`` arguments override config keys (``train-iters=20``). Errors in the configs, the
data, the checkpoints or the launch are printed as one line ``error: ...`` with exit status 2; a run whose
last step or final validation loss is NaN/inf exits with 1; an interrupted run (Ctrl-C / SIGTERM) exits with
130 after saving a checkpoint when save-on-interrupt is on.
See docs/training.md.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys

os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # a dead peer raises instead of hanging
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv):
    p = argparse.ArgumentParser(description="Train from NeoX yml configs (see docs/training.md).")
    p.add_argument(
        "configs",
        nargs="*",
        help="yml files (merged; a key in two files is an error) and key=value "
        "overrides (win over the files; a dotted key sets one entry of a mapping: zero_optimization.stage=1)",
    )
    p.add_argument("--config-b64", help="the resolved config as base64 JSON (set by deepy.py)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # DeepSpeed launcher
    args, unknown = p.parse_known_args(argv)
    if unknown:
        from neox_l2e.config.loader import flag_hint

        hint = flag_hint(unknown)
        p.error(hint or f"unrecognized arguments: {' '.join(unknown)}")
    return args


def load(args):
    from neox_l2e.config import ConfigError, build_config, load_config, parse_override
    from neox_l2e.config.loader import apply_overrides

    files = [c for c in args.configs if "=" not in c]
    overrides = dict(parse_override(c) for c in args.configs if "=" in c)
    if args.config_b64:
        values = json.loads(base64.b64decode(args.config_b64).decode())
        sources = {k: "<deepy>" for k in values}
        apply_overrides(values, sources, overrides)
        return build_config(values, sources)
    if not files:
        raise ConfigError("no config file given; usage: train.py CONFIG.yml [CONFIG.yml ...] [key=value ...]")
    return load_config(files, overrides)


def user_errors():
    from neox_l2e.errors import NeoXL2EError

    return (NeoXL2EError,)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    rank = _rank()
    errors = user_errors()
    try:
        cfg = load(args)
        from neox_l2e.training.loop import train

        result = train(cfg)
    except errors as e:
        if rank == 0 or not _is_config_error(e):
            prefix = "" if rank == 0 else f"[rank {rank}] "
            print(f"{prefix}error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        return 130
    except RuntimeError as e:
        from neox_l2e.parallel import collective_failure_message, is_collective_failure

        if not is_collective_failure(e):
            raise
        print(f"error: {collective_failure_message(e, rank)}", file=sys.stderr, flush=True)
        return 1
    finally:
        _shutdown()
    if result.interrupted:
        return 130
    from neox_l2e.training.faults import nonfinite_end

    problem = nonfinite_end(result)
    if problem:
        if rank == 0:
            print(f"error: {problem}", file=sys.stderr, flush=True)
        return 1
    return 0


def _rank() -> int:
    """This process's global rank, from whichever launcher started it (torchrun / DeepSpeed's RANK, srun's
    SLURM_PROCID, mpirun's OMPI_/MV2_COMM_WORLD_RANK): only rank 0 prints config errors."""
    try:
        from neox_l2e.parallel import launch_info

        return launch_info().rank
    except Exception:  # noqa: BLE001 - a malformed launch is reported by train() itself
        return 0


def _is_config_error(e) -> bool:
    """Config errors are the same on every rank: rank 0 prints them. Other errors (a launch error, e.g. no
    MASTER_ADDR on the ranks of a remote node, a bad file) may hit some ranks only: every rank prints its own."""
    from neox_l2e.errors import ConfigError

    return isinstance(e, ConfigError)


def _shutdown():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass


if __name__ == "__main__":
    sys.exit(main())
