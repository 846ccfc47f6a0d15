"""Training: DeepSpeed engine setup, the loop, its checkpoint and evaluation policies (checkpointer.py,
validator.py), the NeoX LR schedule, logging, faults (checkpoints: neox_l2e.checkpoint, whose readers are
re-exported here)."""

from ..checkpoint import CheckpointError, latest_tag, list_tags, read_model_states, write_weights_checkpoint
from .faults import TrainingError
from .schedule import AnnealingLR, neox_lr

__all__ = [
    "AnnealingLR",
    "CheckpointError",
    "TrainingError",
    "latest_tag",
    "list_tags",
    "neox_lr",
    "read_model_states",
    "write_weights_checkpoint",
    "train",
    "Trainer",
    "TrainResult",
    "StepResult",
]


def __getattr__(name):  # the loop imports DeepSpeed: only on demand
    if name in ("train", "Trainer", "TrainResult", "StepResult"):
        from . import loop

        return getattr(loop, name)
    raise AttributeError(name)
