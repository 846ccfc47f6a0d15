"""Faults: NaN/inf steps, interrupts, and the errors the command line turns into one line.

- A step whose loss is NaN/inf on ANY rank is skipped on every rank (a flag is all-reduced with the
  loss, so all ranks decide together); after ``max-bad-steps`` consecutive such steps training stops
  with ``TrainingError``.
- A dead rank: the process group is created with ``dist-timeout-s``, so a collective waiting on a dead
  peer raises instead of hanging (torchrun / the DeepSpeed launcher then stop the other ranks).
- Ctrl-C / SIGTERM set a flag (see ``InterruptFlag``); the loop finishes the current step, all ranks
  agree through the same all-reduce, a checkpoint is saved when ``save-on-interrupt`` is on.
"""

from __future__ import annotations

import contextlib
import signal
from typing import Optional

from ..errors import TrainingError

__all__ = ["TrainingError", "InterruptFlag", "nonfinite_end", "skipped_update"]


class InterruptFlag:
    """Installs SIGINT/SIGTERM handlers that only record the signal; restores the old ones on exit."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signum = signum

    @property
    def set(self) -> bool:
        return self.signum is not None

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


@contextlib.contextmanager
def skipped_update(optimizer, skip: bool):
    """Make the base torch optimizer's step() a no-op for one DeepSpeed engine.step().

    DeepSpeed still runs its bookkeeping (gradient reduction and clearing, counters), but neither the
    weights nor the Adam moments and step count change: a clean skip under every ZeRO stage and precision.
    """
    if not skip:
        yield
        return
    optimizer.step = lambda *a, **k: None
    try:
        yield
    finally:
        del optimizer.step


def nonfinite_end(result) -> Optional[str]:
    """One line when a finished run ended badly: its last step was skipped for a NaN/inf loss (no update), or
    its final validation loss is NaN/inf; None otherwise. train.py then exits non-zero."""
    import math

    if getattr(result, "interrupted", False):
        return None
    losses = getattr(result, "train_losses", None) or []
    if losses and not math.isfinite(losses[-1][1]):
        return (
            f"the last step ({losses[-1][0]}) had a NaN/inf loss and was skipped: the run did not end with a "
            "finite update; lower the lr, check the data, or resume from an earlier checkpoint"
        )
    valid = getattr(result, "valid_losses", None) or []
    if valid and not math.isfinite(valid[-1][1]):
        return (
            f"the final validation loss at step {valid[-1][0]} is {valid[-1][1]}: the trained model is not "
            "usable as it is; check the data and the lr, or resume from an earlier checkpoint"
        )
    return None
