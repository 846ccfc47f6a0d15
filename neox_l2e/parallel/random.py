"""Model-parallel RNG tracking for dropout (held by the ParallelState as ``ps.rng``; no globals).

Two kinds of random streams exist under tensor parallelism:

* the *shared* stream: torch's default generator (CPU, and the current CUDA device's). It must
  be identical on every rank of a TP group, because dropout on replicated activations (hidden
  dropout, embedding dropout) has to drop the same elements on every rank. ``seed`` sets it
  to ``seed`` on all ranks (the training loop does the same); so anything that draws from torch's
  default generator must draw identically on all ranks of a TP group.
* the *model-parallel* stream: used where each TP rank holds different data, i.e. attention
  dropout on this rank's heads. It is seeded with ``seed + 2718 + tp_rank`` (Megatron's offset),
  so every TP rank draws an independent mask. Code enters it with ``with ps.rng.fork(): ...``;
  the fork swaps the stream's state into torch's default generator of the tracker's device
  and back, so ops without a generator argument (F.dropout, scaled_dot_product_attention) use it.

``get_states`` / ``set_states`` return and restore every stream (the shared ones included) so
a checkpoint resumes with the same dropout masks. ``checkpoint_contexts`` is a ``context_fn`` for
``torch.utils.checkpoint(..., use_reentrant=False)``: the recomputation replays the tracked
streams as they stood in the forward (torch itself replays only the default generators).
"""

from __future__ import annotations

import contextlib
from typing import Dict, Optional

import torch

MODEL_PARALLEL = "model-parallel"
MODEL_PARALLEL_SEED_OFFSET = 2718


def _device_type(device) -> str:
    return torch.device(device).type if device is not None else "cpu"


class RNGTracker:
    """Named RNG streams for one rank; ``fork(name)`` runs a block on a stream."""

    def __init__(self, device: Optional[torch.device] = None):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._states: Dict[str, torch.Tensor] = {}
        self.seed_value: Optional[int] = None

    # ---- the default generator of the tracker's device ----
    def _get_default(self) -> torch.Tensor:
        if self.device.type == "cuda":
            return torch.cuda.get_rng_state(self.device)
        return torch.get_rng_state()

    def _set_default(self, state: torch.Tensor) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state, self.device)
        else:
            torch.set_rng_state(state)

    # ---- streams ----
    @property
    def seeded(self) -> bool:
        return self.seed_value is not None

    def add(self, name: str, seed: int) -> None:
        """Create stream ``name`` seeded with ``seed`` (the default generator is not touched)."""
        if name in self._states:
            raise ValueError(f"RNG stream {name!r} already exists")
        gen = torch.Generator(device=self.device)  # same state format as the device's default generator
        gen.manual_seed(seed)
        self._states[name] = gen.get_state()

    def seed(self, seed: int, tp_rank: int = 0, shared: bool = True) -> None:
        """Seed the model-parallel stream with ``seed + 2718 + tp_rank`` and, with ``shared``, the shared stream
        (torch's default generators: CPU and every CUDA device) with ``seed``, the same on every rank.
        The model seeds only the model-parallel stream (building a model does not reset torch's generator);
        the training loop seeds the shared one (the same seed on every rank)."""
        self._states.clear()
        self.seed_value = int(seed)
        if self.device.type == "meta":
            return
        if shared:
            torch.manual_seed(seed)
        self.add(MODEL_PARALLEL, seed + MODEL_PARALLEL_SEED_OFFSET + tp_rank)

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL):
        """Run the block with torch's default generator (of the tracker's device) on stream ``name``."""
        if self.device.type == "meta":
            yield
            return
        if name not in self._states:
            raise RuntimeError(f"RNG stream {name!r} does not exist; call ps.rng.seed(seed, tp_rank) first")
        saved = self._get_default()
        self._set_default(self._states[name])
        try:
            yield
        finally:
            self._states[name] = self._get_default()
            self._set_default(saved)

    # ---- checkpoints ----
    def get_states(self) -> dict:
        """Every stream of this rank: the tracked ones and the shared default generators."""
        out = {
            "seed": self.seed_value,
            "streams": {k: v.clone() for k, v in self._states.items()},
            "cpu": torch.get_rng_state(),
        }
        if self.device.type == "cuda":
            out["cuda"] = torch.cuda.get_rng_state(self.device)
        return out

    def set_states(self, states: dict) -> None:
        self.seed_value = states.get("seed", self.seed_value)
        self._states = {k: v.clone() for k, v in states.get("streams", {}).items()}
        if states.get("cpu") is not None:
            torch.set_rng_state(states["cpu"])
        if self.device.type == "cuda" and states.get("cuda") is not None:
            torch.cuda.set_rng_state(states["cuda"], self.device)

    # ---- activation checkpointing ----
    def checkpoint_contexts(self):
        """``context_fn`` for torch.utils.checkpoint (non-reentrant): the forward snapshots the tracked
        streams, the recomputation runs on that snapshot and then puts the current states back."""
        snapshot: Dict[str, torch.Tensor] = {}
        tracker = self

        @contextlib.contextmanager
        def forward_ctx():
            snapshot.clear()
            snapshot.update({k: v.clone() for k, v in tracker._states.items()})
            yield

        @contextlib.contextmanager
        def recompute_ctx():
            current = tracker._states
            tracker._states = {k: v.clone() for k, v in snapshot.items()}
            try:
                yield
            finally:
                tracker._states = current

        return forward_ctx(), recompute_ctx()
