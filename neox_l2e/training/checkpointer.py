"""The trainer's checkpoint policy: what a run resumes from, and when it saves.

    ck = Checkpointer(cfg, ps)                 # the save lock, the resume tag (checked before anything is built)
    ck.load_weights_before_engine(model)       # finetune / ZeRO-3 without optimizer: weights before DeepSpeed
    state = ck.resume(engine, scheduler)       # iteration, consumed samples, first train sample count
    ck.should_save(iteration) -> bool          # checkpoint-factor and extra-save-iters (not at the last step)
    ck.save(engine, iteration, client_state)   # the tag written, or None
    ck.close()                                 # releases the save lock

The mechanics (atomic folders, manifests, layouts, DeepSpeed loads) live in neox_l2e.checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .. import checkpoint as ckpt
from ..config import NeoXConfig


@dataclass
class ResumeState:
    """Where a run starts: its step, the samples consumed, the checkpoint it resumed from (None: fresh or
    finetune), and ``first_train_samples``: the train sample count the run's data order was first built for
    (None: unknown, a checkpoint written before it was stored)."""

    iteration: int = 0
    consumed: int = 0
    resumed_from: Optional[str] = None
    first_train_samples: Optional[int] = None


class Checkpointer:
    """Resume decisions and the save policy of one run (every rank builds one)."""

    def __init__(self, cfg: NeoXConfig, ps):
        self.cfg, self.ps = cfg, ps
        t = cfg.training
        self.save_dir = t.save or None
        self.lock = ckpt.acquire_save_lock(t.save, ps) if t.save else None  # one job per save folder
        self.resume_tag = ckpt.latest_tag(t.load) if t.load else None
        self.finetuned_from: Optional[str] = None
        if self.resume_tag is not None:
            # a corrupted checkpoint, a config that changes the model or a layout this run cannot load fails
            # here, before the data and model are built
            ckpt.check_resume(cfg, t.load, self.resume_tag, ps)

    @property
    def resuming(self) -> bool:
        """True when the run continues a checkpoint (a latest tag in load, not a finetune)."""
        return self.resume_tag is not None and not self.cfg.training.finetune

    def saved_first_train_samples(self) -> Optional[int]:
        """The first train sample count stored in the checkpoint resumed from (None: fresh run, finetune, or a
        checkpoint without it). Read before the data is built (rank 0's client state; no DeepSpeed)."""
        if not self.resuming:
            return None
        sd = ckpt.torch_load(Path(self.cfg.training.load) / self.resume_tag / ckpt.model_states_name(0), mmap=True)
        client = sd if isinstance(sd, dict) else {}
        n0 = client.get("first_train_samples")
        return int(n0) if n0 is not None else None

    def load_weights_before_engine(self, model) -> None:
        """Weights that must be in the model before DeepSpeed wraps it: a finetune's, or ZeRO-3's when the
        optimizer state is not loaded (ZeRO-3 restores its weights from the optimizer shards; without them, from
        the consolidated weights, mp_rank_00_model_states.pt, before DeepSpeed partitions the model)."""
        t, ps = self.cfg.training, self.ps
        if t.load and t.finetune:
            ckpt.load_weights_into(model, t.load, ps.tp_rank)
            self.finetuned_from = t.load
        elif self.resume_tag is not None and t.no_load_optim and self.cfg.zero_stage == 3:
            ckpt.load_weights_into(model, t.load, ps.tp_rank, tag=self.resume_tag)

    def resume(self, engine, scheduler) -> ResumeState:
        """Loads the checkpoint into the engine and the lr schedule; a fresh state when not resuming."""
        t = self.cfg.training
        if not self.resuming:
            return ResumeState()
        client = ckpt.load_checkpoint(
            engine, t.load, self.ps, load_optimizer=not t.no_load_optim, tag=self.resume_tag, layout_checked=True
        )  # checked in __init__, once
        if "lr_scheduler" in client:
            scheduler.load_state_dict(client["lr_scheduler"])
        n0 = client.get("first_train_samples")
        return ResumeState(
            iteration=int(client.get("iteration", 0)),
            consumed=int(client.get("consumed_train_samples", 0)),
            resumed_from=f"{t.load}/{client['tag']}",
            first_train_samples=int(n0) if n0 is not None else None,
        )

    def should_save(self, iteration: int) -> bool:
        """A periodic save after this step: every checkpoint-factor steps and at extra-save-iters, except at the
        last step (the final save covers it)."""
        t = self.cfg.training
        if not self.save_dir or iteration >= t.train_iters:
            return False
        if t.checkpoint_factor and iteration % t.checkpoint_factor == 0:
            return True
        return bool(t.extra_save_iters) and iteration in t.extra_save_iters

    def should_save_at_end(self, interrupted: bool) -> bool:
        """The final save: always at the end of a finished run; on an interrupt when save-on-interrupt is on."""
        if not self.save_dir:
            return False
        return self.cfg.training.save_on_interrupt if interrupted else True

    def save(self, engine, iteration: int, client_state: dict) -> Optional[str]:
        """Saves a checkpoint (every rank); the tag, or None when there is no save folder."""
        if not self.save_dir:
            return None
        return ckpt.save_checkpoint(
            engine,
            self.save_dir,
            iteration,
            client_state,
            self.ps,
            keep_last_n=self.cfg.training.keep_last_n_checkpoints,
        )

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None
