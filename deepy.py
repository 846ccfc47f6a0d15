#!/usr/bin/env python
"""NeoX-style launcher: merge the yml configs, check the launch, start the DeepSpeed launcher.

    python deepy.py train.py CONFIG.yml [CONFIG.yml ...] [key=value ...]          # this node, all GPUs
    python deepy.py --num_gpus 2 train.py configs/local/demo.yml                  # 2 CPU ranks (gloo)
    python deepy.py --hostfile hostfile train.py CONFIG.yml ...                   # multi-node (pdsh/openmpi/...)

Launcher settings come from the config (hostfile, num-gpus, num-nodes, include, exclude, master-port,
master-addr, launcher) and may be overridden by the flags below. The hostfile is DeepSpeed's: one
line ``hostname slots=N`` per node. Every rank receives the merged, resolved config. A launch the
config cannot run on (world size not divisible by model-parallel-size, batch mismatch) fails here
with one line. The slurm, openmpi and mvapich launchers (srun / mpirun) give the ranks no MASTER_ADDR:
the resolved config then carries master-addr (default: the hostfile's first host left after
include / exclude) and master-port,
which the ranks use unless MASTER_ADDR / MASTER_PORT are exported. See docs/training.md.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

# DeepSpeed runners that start the ranks with srun / mpirun and export no MASTER_ADDR / MASTER_PORT to them; the
# ranks map SLURM_* / OMPI_COMM_WORLD_* / MV2_COMM_WORLD_* themselves (neox_l2e.parallel.launch_info)
NO_RENDEZVOUS_EXPORT = ("slurm", "openmpi", "mvapich")


def parse_args(argv):
    p = argparse.ArgumentParser(description="Launch train.py on one or many nodes with the DeepSpeed launcher.")
    p.add_argument("--hostfile", help="DeepSpeed hostfile (lines 'host slots=N')")
    p.add_argument("--num_gpus", "--num-gpus", type=int, help="ranks per node (GPUs, or CPU processes)")
    p.add_argument("--num_nodes", "--num-nodes", type=int, help="nodes to use (-1: all in the hostfile)")
    p.add_argument("--include", help="DeepSpeed --include filter")
    p.add_argument("--exclude", help="DeepSpeed --exclude filter")
    p.add_argument(
        "--master_port",
        "--master-port",
        type=int,
        help="rendezvous port of rank 0 (default: the config's master-port, 29500)",
    )
    p.add_argument(
        "--master_addr",
        "--master-addr",
        help="rendezvous address, the host of rank 0 (default: the config's master-addr; else the "
        "DeepSpeed launcher picks the first host)",
    )
    p.add_argument(
        "--launcher", help="multi-node launcher (with a hostfile): pdsh, openmpi, mvapich, mpich, impi, slurm"
    )
    p.add_argument("--dry-run", action="store_true", help="print the launch command and exit")
    p.add_argument("args", nargs=argparse.REMAINDER, help="[train.py] CONFIG.yml ... [key=value ...]")
    args, unknown = p.parse_known_args(argv)
    from neox_l2e.config.loader import flag_hint

    hint = flag_hint(unknown + list(args.args))  # --train-iters 5 where train-iters=5 was meant
    if hint:
        p.error(hint)
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def read_hostfile(path) -> dict:
    from neox_l2e.config import ConfigError

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: hostfile not found")
    hosts = {}
    for n, line in enumerate(p.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.match(r"^(\S+)\s+slots=(\d+)$", line)
        if not m:
            raise ConfigError(f"{path}:{n}: expected 'hostname slots=N', got {line!r}")
        hosts[m.group(1)] = int(m.group(2))
    if not hosts:
        raise ConfigError(f"{path}: no hosts")
    return hosts


def first_active_host(hosts: dict, include, exclude) -> str:
    """The first hostfile host left after DeepSpeed's --include / --exclude filtering (where its runner puts rank 0)."""
    if not include and not exclude:
        return next(iter(hosts))
    from deepspeed.launcher.runner import parse_inclusion_exclusion

    from neox_l2e.config import ConfigError

    try:
        active = parse_inclusion_exclusion(hosts, include or "", exclude or "")
    except ValueError as e:
        raise ConfigError(f"--include / --exclude: {e}") from None
    if not active:
        raise ConfigError("--include / --exclude leave no host of the hostfile")
    return next(iter(active))


def local_devices() -> int:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.device_count()
    except ImportError:
        pass
    return 1


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from neox_l2e.config import ConfigError, load_config, parse_override

    try:
        rest = list(args.args)
        script = "train.py"
        if rest and rest[0].endswith(".py"):
            script = rest.pop(0)
        files = [a for a in rest if "=" not in a]
        overrides = dict(parse_override(a) for a in rest if "=" in a)
        if not files:
            raise ConfigError("no config file given; usage: deepy.py [train.py] CONFIG.yml [...] [key=value ...]")
        cfg = load_config(files, overrides)
        p = cfg.parallel
        hostfile = args.hostfile or p.hostfile
        num_gpus = args.num_gpus or p.num_gpus
        num_nodes = args.num_nodes if args.num_nodes is not None else p.num_nodes
        if hostfile:
            hosts = read_hostfile(hostfile)
            slots = list(hosts.values())
            if num_nodes and num_nodes > 0:
                slots = slots[:num_nodes]
            world = sum(min(s, num_gpus) if num_gpus else s for s in slots)
        else:
            world = num_gpus or local_devices()
        if not args.include and not args.exclude and not p.include and not p.exclude:
            cfg.check_world_size(world)
        if not Path(script).is_file():
            raise ConfigError(f"{script}: training script not found")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    launcher = (args.launcher or p.launcher or "pdsh").lower()
    master_addr = args.master_addr or p.master_addr
    master_port = args.master_port or p.master_port
    if hostfile and launcher in NO_RENDEZVOUS_EXPORT and not master_addr:
        # srun / mpirun give the ranks no MASTER_ADDR: rank 0 runs on the first host (mpirun fills the hostfile's
        # hosts in order; for srun, list the nodes as `scontrol show hostnames` does) that --include / --exclude
        # leave. An exported MASTER_ADDR wins.
        try:
            master_addr = first_active_host(hosts, args.include or p.include, args.exclude or p.exclude)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    cmd = [sys.executable, "-m", "deepspeed.launcher.runner"]
    if hostfile:
        cmd += ["--hostfile", hostfile, "--launcher", launcher]
        if num_nodes and num_nodes > 0:
            cmd += ["--num_nodes", str(num_nodes)]
    else:
        # a single node without a hostfile: --num_gpus also counts CPU ranks
        cmd += ["--num_gpus", str(world)]
    if num_gpus and hostfile:
        cmd += ["--num_gpus", str(num_gpus)]
    for flag, value in (
        ("--include", args.include or p.include),
        ("--exclude", args.exclude or p.exclude),
        ("--master_addr", master_addr),
    ):
        if value:
            cmd += [flag, str(value)]
    cmd += ["--master_port", str(master_port)]
    # "auto" needs the files' keys: decide here; the ranks read master-addr / master-port from the resolved
    # config when their environment has no MASTER_*
    values = dict(cfg.to_dict(), data_order=cfg.data_order, master_addr=master_addr, master_port=master_port)
    resolved = base64.b64encode(json.dumps(values, default=str).encode()).decode()
    cmd += [script, "--config-b64", resolved]
    if args.dry_run:
        print(" ".join(shlex.quote(c) for c in cmd))
        return 0
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    try:
        return subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
