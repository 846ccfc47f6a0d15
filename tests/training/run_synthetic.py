"""Train the tiny config on the synthetic dataset in this process (for subprocess tests).

    python tests/training/run_synthetic.py key=value ...      (also under torchrun / with RANK, WORLD_SIZE set)
    python deepy.py --num_gpus 2 tests/training/run_synthetic.py configs/local/tiny.yml key=value ...

Prints ``RESULT <json>`` on rank 0 at the end. Faults from the environment (train_common.install_faults_from_env):
DIE_AT=<iteration>@<rank> makes that rank exit abruptly inside that step (a crashed rank), TEST_NAN_STEPS and
TEST_KILL_IN_SAVE. Errors are reported like train.py: one line, exit 2.
"""

import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]

from train_common import datasets, install_faults_from_env, tiny_cfg  # noqa: E402


def main():
    from neox_l2e.config import ConfigError, parse_override
    from neox_l2e.training import CheckpointError, TrainingError
    from neox_l2e.training.loop import train

    rank = int(os.environ.get("RANK", "0"))
    install_faults_from_env(rank)

    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    try:
        if argv and argv[0] == "--config-b64":  # started by deepy.py: the resolved config
            import base64

            from neox_l2e.config import build_config

            cfg = build_config(json.loads(base64.b64decode(argv[1])), {})
        else:
            cfg = tiny_cfg(**dict(parse_override(a) for a in argv if "=" in a and not a.endswith(".yml")))
        r = train(cfg, datasets=datasets())
    except (ConfigError, CheckpointError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if rank == 0:
        print(
            "RESULT "
            + json.dumps(
                {
                    "iteration": r.iteration,
                    "start": r.start_iteration,
                    "losses": [l for _, l in r.train_losses],
                    "checkpoints": r.checkpoints,
                    "interrupted": r.interrupted,
                    "skipped": r.skipped_steps,
                }
            ),
            flush=True,
        )
    return 130 if r.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
