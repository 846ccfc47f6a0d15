#!/usr/bin/env python
"""Re-shard a neox-l2e training checkpoint to another tensor-/data-parallel layout.

    python tools/reshard_checkpoint.py runs/a runs/a-tp1 --tp 1 [--dp 2] [--tag global_step1000]

Then resume with the new layout: train.py CONFIG.yml load=runs/a-tp1 model-parallel-size=1 (launch tp x dp
ranks). Carried: weights, L2E state, iteration / consumed samples / LR schedule, and the AdamW state for
ZeRO 1/2 and fp32 ZeRO 0. Restarted: RNG states. docs/parallelism.md has the details.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="checkpoint directory (the one holding 'latest')")
    p.add_argument("dst", help="output checkpoint directory")
    p.add_argument("--tp", type=int, required=True, help="new model-parallel-size")
    p.add_argument(
        "--dp",
        type=int,
        default=None,
        help="data-parallel size of the run that will resume (ZeRO shards are written for it; default: the source's)",
    )
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the source's latest)")
    p.add_argument("--no-optimizer", action="store_true", help="do not carry the optimizer state")
    p.add_argument(
        "--no-verify", action="store_true", help="do not check the source files against its manifest (size and sha256)"
    )
    args = p.parse_args(argv)
    from neox_l2e.checkpoint.reshard import reshard_checkpoint
    from neox_l2e.errors import NeoXL2EError

    try:
        rep = reshard_checkpoint(
            args.src,
            args.dst,
            args.tp,
            args.dp,
            args.tag,
            carry_optimizer=not args.no_optimizer,
            verify=not args.no_verify,
            log=lambda line: print(line, file=sys.stderr),
        )
    except (NeoXL2EError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"{rep['path']}: TP {rep['from'][0]} x DP {rep['from'][1]} -> TP {rep['to'][0]} x DP {rep['to'][1]} "
        f"(ZeRO {rep['zero_stage']})"
    )
    print("carried: " + "; ".join(rep["carried"]))
    print("restarted: " + "; ".join(rep["restarted"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
