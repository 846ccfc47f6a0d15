"""The training loop: NeoX-style steps on a DeepSpeed engine, evaluation, checkpoints, L2E hooks.

    result = train(cfg)                        # data from cfg.data (neox_l2e.data)
    result = train(cfg, datasets={...}, vocab_size=V)   # tests / tools: any datasets with {"text": [seq+1]}

One step (iteration -> iteration + 1), L2E through the model's controller ``l2e`` (neox_l2e.l2e.L2EController):
    l2e.begin_step(iteration)
    gas x { tokens [mb, seq+1] -> loss = lm + l2e.loss_term() -> engine.backward -> l2e.end_micro_batch(ok) }
    (one small device-to-host copy per micro-batch: the NaN/interrupt flags and every layer's L2E values)
    engine.step() (skipped on every rank when any rank saw a NaN/inf loss)
    lr schedule advances on applied steps; consumed samples advance always.
train_step() returns a StepResult; train() keeps the log windows, the bad-step count and the timing. When to save
and what to resume from: checkpointer.Checkpointer; when to evaluate (valid loss, held-out monosemanticity):
validator.Validator.
"""

from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from ..config import ConfigError, NeoXConfig
from .checkpointer import Checkpointer
from .engine import build_engine, setup_distributed, wall_clock_timings
from .faults import InterruptFlag, TrainingError, skipped_update
from .monitor import Monitor, fmt_count
from .schedule import AnnealingLR
from .validator import Validator, heldout_layers, heldout_tokens, sample_iterator


@dataclass
class StepResult:
    """What one train_step did: the lr it used, whether a micro-batch had a NaN/inf loss (``bad``: the update was
    skipped on every rank), whether the optimizer update was applied (False also for an fp16 overflow), whether
    an interrupt was seen, the mean lm / L2E losses (lm NaN when bad; l2e None without L2E) and the gradient norm
    (None when not applied or not recorded)."""

    lr: float
    bad: bool
    applied: bool
    stop: bool
    lm_loss: float
    l2e_loss: Optional[float] = None
    grad_norm: Optional[float] = None


@dataclass
class LogWindow:
    """The steps since the last train log line: their losses, times and gradient norms."""

    loss: list = field(default_factory=list)
    l2e: list = field(default_factory=list)
    time: list = field(default_factory=list)
    gn: list = field(default_factory=list)

    def add(self, s: StepResult, dt: float) -> None:
        if not s.bad:
            self.loss.append(s.lm_loss)
            if s.l2e_loss is not None:
                self.l2e.append(s.l2e_loss)
            if s.grad_norm is not None:
                self.gn.append(s.grad_norm)
        self.time.append(dt)


@dataclass
class TrainResult:
    iteration: int = 0
    start_iteration: int = 0
    consumed_train_samples: int = 0
    train_losses: list = field(default_factory=list)  # (iteration, lm loss) for every step, NaN when skipped
    valid_losses: list = field(default_factory=list)  # (iteration, valid lm loss)
    lrs: list = field(default_factory=list)  # (iteration, lr used by that step)
    skipped_steps: int = 0  # NaN/inf steps skipped
    overflow_steps: int = 0  # fp16 loss-scale overflows (skipped by DeepSpeed)
    checkpoints: list = field(default_factory=list)
    tokens_per_s: float = 0.0
    elapsed_s: float = 0.0
    l2e_metrics: dict = field(default_factory=dict)  # layer -> l2e_train metrics (running stats; last logged)
    heldout_metrics: dict = field(default_factory=dict)  # layer -> ms_heldout metrics (fixed set; last evaluation)
    heldout_history: list = field(default_factory=list)  # (iteration, {layer -> ms_heldout metrics})
    interrupted: bool = False
    num_parameters: int = 0
    log_dir: Optional[str] = None


# ------------------------------------------------------------------------------------------------
# data


def train_samples(cfg: NeoXConfig, dp: int) -> int:
    """The number of train samples a run of train-iters steps reads (every DP rank together)."""
    t = cfg.training
    return t.train_iters * t.train_micro_batch_size_per_gpu * t.gradient_accumulation_steps * dp


def build_data(cfg: NeoXConfig, dp: int, first_train_samples: Optional[int] = None):
    """(datasets, vocab_size, tokenizer) from cfg.data through neox_l2e.data. ``first_train_samples``: the train
    sample count the run's order was first built for (a resumed run; data-order neox): that order is kept, and
    extended epoch by epoch when this run needs more samples."""
    from ..data import build_datasets, build_tokenizer

    d, t = cfg.data, cfg.training
    tokenizer = None
    vocab = cfg.model.vocab_size
    if d.vocab_file:
        tokenizer = build_tokenizer(d.tokenizer_type, d.vocab_file)
        vocab = vocab or tokenizer.vocab_size
    eval_samples = t.eval_iters * t.train_micro_batch_size_per_gpu * dp
    num_samples = {"train": train_samples(cfg, dp), "valid": eval_samples, "test": eval_samples}
    first = None
    if first_train_samples is not None:
        # never fewer samples than the first order held: a shorter resumed run reads a prefix of that same order
        num_samples["train"] = max(num_samples["train"], int(first_train_samples))
        first = {"train": int(first_train_samples)}
    datasets = build_datasets(
        d,
        cfg.model.seq_length,
        t.seed,
        num_samples=num_samples,
        vocab_size=vocab,
        data_order=cfg.data_order,
        first_num_samples=first,
    )
    if not datasets.get("train"):
        raise ConfigError("no training data: set train-data-paths (and valid-data-paths) or data-path")
    return datasets, vocab, tokenizer


# ------------------------------------------------------------------------------------------------
# the trainer


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def default_log_dir(cfg: NeoXConfig) -> Optional[str]:
    if cfg.logging.log_dir:
        return cfg.logging.log_dir
    if cfg.training.save:
        return cfg.training.save
    return None


class Trainer:
    """One run: the model on a DeepSpeed engine, its data, a Checkpointer (resume and save policy), a Validator
    (evaluation policy) and a Monitor (logs)."""

    def __init__(
        self,
        cfg: NeoXConfig,
        datasets=None,
        vocab_size: Optional[int] = None,
        ps=None,
        quiet: bool = False,
        stream=None,
    ):
        self.cfg = cfg
        t = cfg.training
        self.heldout_layers = heldout_layers(cfg)  # a bad layer list fails before anything is built
        self.ps = ps or setup_distributed(cfg)
        ps = self.ps
        self.checkpointer = Checkpointer(cfg, ps)  # the save lock; a resume checkpoint checked here
        _seed_all(t.seed)
        # the train sample count the run's data order was first built for: kept across resumes (a larger
        # train-iters then extends that order instead of rebuilding it, data-order neox)
        self.first_train_samples = self.checkpointer.saved_first_train_samples()
        if (
            datasets is None
            and ps.is_main
            and self.checkpointer.resuming
            and self.first_train_samples is None
            and cfg.data_order == "neox"
        ):
            print(
                f"note: {t.load}/{self.checkpointer.resume_tag} does not record the train sample count its data "
                "order was built for (an older checkpoint): the order is built for this run's train-iters",
                file=sys.stderr,
                flush=True,
            )
        if datasets is None:
            datasets, vocab_size, self.tokenizer = build_data(cfg, ps.dp, self.first_train_samples)
        if self.first_train_samples is None:
            self.first_train_samples = train_samples(cfg, ps.dp)
        self.datasets = datasets
        self.heldout_tokens = heldout_tokens(cfg, datasets)
        vocab_size = vocab_size or cfg.model.vocab_size
        from ..model import GPTNeoX

        self.model = GPTNeoX(cfg, ps, vocab_size=vocab_size, seed=t.seed)
        self.num_parameters = self.model.num_parameters()
        self.checkpointer.load_weights_before_engine(self.model)
        self.finetuned_from = self.checkpointer.finetuned_from
        self.engine, self.optimizer = build_engine(cfg, self.model, ps)
        self.module = self.engine.module
        self.scheduler = AnnealingLR.from_config(self.optimizer, cfg)
        state = self.checkpointer.resume(self.engine, self.scheduler)
        self.iteration, self.consumed, self.resumed_from = state.iteration, state.consumed, state.resumed_from
        self.global_batch = t.train_micro_batch_size_per_gpu * t.gradient_accumulation_steps * ps.dp
        self.tokens_per_step = self.global_batch * cfg.model.seq_length
        self.l2e = getattr(self.module, "l2e", None) or None  # the model's L2E controller (None: no L2E)
        self.inhibitors = self.l2e.inhibitors if self.l2e else []  # read-only view (layer indices, buffers)
        self.log_dir = default_log_dir(cfg)
        self.monitor = Monitor(
            cfg,
            self.log_dir,
            enabled=ps.is_main and not quiet,
            total_iters=t.train_iters,
            start_iter=self.iteration,
            stream=stream,
        )
        self.validator = Validator(
            cfg, ps, datasets, self.engine, self.inhibitors, self.monitor, self.heldout_layers, self.heldout_tokens
        )
        self.train_iter = sample_iterator(
            self.datasets["train"], t.train_micro_batch_size_per_gpu, ps.dp_rank, ps.dp, consumed_samples=self.consumed
        )
        self.engine.train()

    # ---------------------------------------------------------------- pieces
    def header(self) -> list:
        cfg, ps = self.cfg, self.ps
        lines = [
            f"world size {ps.world_size} | layout TP {ps.tp} x DP {ps.dp} | ZeRO stage {cfg.zero_stage} | "
            f"precision {cfg.precision_name} | device {ps.device.type}",
            f"parameters {fmt_count(self.num_parameters)} ({self.num_parameters:,}) | tokens per step "
            f"{self.tokens_per_step:,} ({self.global_batch} x {cfg.model.seq_length}; micro-batch "
            f"{cfg.training.train_micro_batch_size_per_gpu} x gas {cfg.training.gradient_accumulation_steps} "
            f"x DP {ps.dp})",
        ]
        l2e = (
            f"L2E {cfg.l2e.l2e_method} on layers {cfg.inhibited_layers()} (p = {cfg.l2e.l2e_ratio:g}, "
            f"lambda = {cfg.l2e.l2e_lambda:g}, {cfg.l2e.l2e_loss_reduction})"
            if self.l2e
            else "L2E off"
        )
        lines.append(
            f"train-iters {cfg.training.train_iters} | lr {cfg.lr:g} {cfg.optimizer.lr_decay_style} "
            f"(warmup {self.scheduler.warmup_iters}, min {cfg.optimizer.min_lr:g}) | {l2e}"
        )
        if self.heldout_tokens is not None:
            lines.append(
                f"held-out monosemanticity (ms_heldout/...): {self.heldout_tokens.numel():,} valid tokens, "
                f"layers {self.heldout_layers}, at every evaluation"
            )
        if self.resumed_from:
            lines.append(
                f"resumed from {self.resumed_from} at step {self.iteration} ({self.consumed:,} samples consumed)"
            )
        if self.finetuned_from:
            lines.append(f"weights from {self.finetuned_from} (finetune: fresh optimizer, step 0)")
        return lines

    def _batch(self, it) -> tuple:
        tokens = next(it).to(self.ps.device, non_blocking=True).long()
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.ps.world_size > 1:
            dist.all_reduce(t)
        return t

    def client_state(self) -> dict:
        return {
            "neox_config": self.cfg.to_dict(),
            "iteration": self.iteration,
            "consumed_train_samples": self.consumed,
            "lr_scheduler": self.scheduler.state_dict(),
            "tp": self.ps.tp,
            "dp": self.ps.dp,
            "padded_vocab_size": self.module.vocab_size,
            "num_parameters": self.num_parameters,
            "first_train_samples": self.first_train_samples,
        }

    def save(self) -> Optional[str]:
        """Saves a checkpoint of the current step now (every rank); the tag, or None without a save folder."""
        tag = self.checkpointer.save(self.engine, self.iteration, self.client_state())
        if tag:
            self.monitor.print(f"saved checkpoint {Path(self.cfg.training.save) / tag}")
        return tag

    def evaluate(self, split: str = "valid") -> Optional[float]:
        return self.validator.evaluate(split)

    def measure_heldout(self) -> Optional[dict]:
        return self.validator.measure_heldout()

    def _total_loss(self, lm: torch.Tensor, l2e_loss: Optional[torch.Tensor]) -> torch.Tensor:
        """The loss a micro-batch backpropagates: the lm loss plus the L2E term (tests wrap this method to inject
        faults at a step: tests/training/train_common.py inject_loss)."""
        return lm + self.l2e.loss_term(l2e_loss) if l2e_loss is not None else lm

    def train_step(self, interrupt: Optional[InterruptFlag] = None) -> StepResult:
        t = self.cfg.training
        gas = t.gradient_accumulation_steps
        l2e = self.l2e
        if l2e:
            l2e.begin_step(self.iteration)
        lr = self.scheduler.get_lr()
        bad = False
        stop = False
        lm_sum, l2e_sum, l2e_n = 0.0, 0.0, 0
        own_norm = None
        for micro in range(gas):
            x, y = self._batch(self.train_iter)
            out = self.engine(x)
            lm = self.module.lm_loss(out.logits, y)
            l2e_loss = l2e.loss() if l2e else None
            loss = self._total_loss(lm, l2e_loss)
            finite = torch.isfinite(loss.detach())
            zero = torch.zeros((), device=lm.device, dtype=torch.float32)
            flags = torch.stack(
                [
                    torch.where(finite, lm.detach().float(), zero),
                    torch.where(finite, l2e_loss.detach().float(), zero) if l2e_loss is not None else zero,
                    (~finite).float(),
                    torch.full((), float(interrupt is not None and interrupt.set), device=lm.device),
                ]
            )
            self._all_reduce(flags)  # every rank decides the same thing
            self.engine.backward(loss)
            # L2E commits on the device (merges statistics over DP, moves the threshold; a NaN/inf micro-batch
            # is dropped on every rank), then one copy to the host for the flags and the L2E values together
            l2e_vals = l2e.end_micro_batch_device(flags[2] == 0) if l2e else None
            host = (torch.cat([flags.double(), l2e_vals]) if l2e_vals is not None else flags).tolist()
            flags, micro_bad = host[:4], host[2] > 0
            if l2e:
                l2e.end_micro_batch_host(host[4:], ok=not micro_bad)
            bad = bad or micro_bad
            stop = stop or flags[3] > 0
            if not micro_bad:
                lm_sum += flags[0] / self.ps.world_size
                if l2e_loss is not None:
                    l2e_sum += flags[1] / self.ps.world_size
                    l2e_n += 1
            # engine.step() after every micro-batch (DeepSpeed counts micro-steps); the last one is the
            # accumulation boundary that runs the optimizer, made a no-op when any micro-batch was bad
            if micro == gas - 1 and not bad and self._own_grad_norm:
                own_norm = self._grad_norm()
            with skipped_update(self.optimizer, bad and micro == gas - 1):
                self.engine.step()
        applied = (not bad) and self.engine.was_step_applied()
        stats = StepResult(
            lr=lr,
            bad=bad,
            applied=applied,
            stop=stop,
            lm_loss=lm_sum / gas if not bad else float("nan"),
            l2e_loss=(l2e_sum / l2e_n) if l2e_n else None,
        )
        if applied:
            self.scheduler.step()
        gn = (own_norm if self._own_grad_norm else self.engine.get_global_grad_norm()) if applied else None
        if gn is not None:
            gn = float(gn)
            stats.grad_norm = gn if math.isfinite(gn) else None
        self.iteration += 1
        self.consumed += self.global_batch
        return stats

    @property
    def _own_grad_norm(self) -> bool:
        """DeepSpeed records the global gradient norm except without ZeRO in fp32: then we compute it."""
        return self.cfg.zero_stage == 0 and self.cfg.precision_name == "fp32" and self.cfg.logging.log_grad_norm

    @torch.no_grad()
    def _grad_norm(self) -> float:
        """Global L2 norm of the (DP-averaged, unclipped) gradients; TP-split parameters summed over the TP group."""
        dev = self.ps.device
        split = torch.zeros((), dtype=torch.float64, device=dev)
        replicated = torch.zeros((), dtype=torch.float64, device=dev)
        for p in self.module.parameters():
            if p.grad is None:
                continue
            sq = p.grad.detach().double().pow(2).sum()
            if getattr(p, "tp_partition_dim", None) is not None:
                split += sq
            else:
                replicated += sq
        self.ps.all_reduce_tp(split)
        return float((split + replicated).sqrt())

    # ---------------------------------------------------------------- the loop
    def train(self) -> TrainResult:
        cfg, t, ps = self.cfg, self.cfg.training, self.ps
        res = TrainResult(
            iteration=self.iteration,
            start_iteration=self.iteration,
            consumed_train_samples=self.consumed,
            num_parameters=self.num_parameters,
            log_dir=self.log_dir,
        )
        mon = self.monitor
        mon.header(self.header())
        mon.log(
            "run",
            self.iteration,
            {
                "world_size": ps.world_size,
                "tp": ps.tp,
                "dp": ps.dp,
                "zero_stage": cfg.zero_stage,
                "precision": cfg.precision_name,
                "num_parameters": self.num_parameters,
                "tokens_per_step": self.tokens_per_step,
                "l2e_layers": [i.layer_index for i in self.l2e.inhibitors] if self.l2e else [],
            },
        )
        self._consecutive_bad = 0
        window = LogWindow()
        timer = StepTimer(res.start_iteration, t.train_iters)
        t_start = time.perf_counter()
        mon.start_bar()
        try:
            with InterruptFlag() as interrupt:
                while self.iteration < t.train_iters:
                    t0 = time.perf_counter()
                    s = self.train_step(interrupt)
                    dt = time.perf_counter() - t0
                    timer.add(self.iteration, dt)
                    res.train_losses.append((self.iteration, s.lm_loss))
                    res.lrs.append((self.iteration, s.lr))
                    self._account_bad_step(s, res)
                    window.add(s, dt)
                    avg_dt = timer.mean_or(dt)
                    tps = self.tokens_per_step / avg_dt if avg_dt > 0 else 0.0
                    last_loss = window.loss[-1] if window.loss else float("nan")
                    mon.update_bar(
                        self.iteration, last_loss, s.lr, tps, avg_dt, (t.train_iters - self.iteration) * avg_dt
                    )
                    if (
                        self.iteration % cfg.logging.log_interval == 0
                        or self.iteration == res.start_iteration + 1
                        or self.iteration == t.train_iters
                    ):
                        self._log_train(window, s, tps, res)
                        window = LogWindow()
                    if self.validator.should_evaluate(self.iteration):
                        self._validate(res)
                    if self.checkpointer.should_save(self.iteration):
                        self._save_into(res)
                    if s.stop:
                        res.interrupted = True
                        break
            if res.interrupted:
                mon.print(f"interrupted at step {self.iteration}")
            else:
                self._validate(res)
            if self.checkpointer.should_save_at_end(res.interrupted):
                self._save_into(res)
        finally:
            mon.close()
            self.checkpointer.close()
        res.iteration, res.consumed_train_samples = self.iteration, self.consumed
        res.elapsed_s = time.perf_counter() - t_start
        res.tokens_per_s = self.tokens_per_step * timer.steps / timer.total if timer.total > 0 else 0.0
        return res

    def _account_bad_step(self, s: StepResult, res: TrainResult) -> None:
        """Counts skipped (NaN/inf) and overflowed steps; a TrainingError after max-bad-steps bad steps in a row."""
        t = self.cfg.training
        if not s.bad:
            self._consecutive_bad = 0
            if not s.applied:
                res.overflow_steps += 1
            return
        res.skipped_steps += 1
        self._consecutive_bad += 1
        n = self._consecutive_bad
        self.monitor.print(
            f"warning: step {self.iteration}: NaN/inf loss, step skipped "
            f"({n} in a row, limit max-bad-steps={t.max_bad_steps})"
        )
        self.monitor.log("train", self.iteration, {"skipped": 1, "consecutive_bad_steps": n})
        if n >= t.max_bad_steps:
            raise TrainingError(
                f"{n} consecutive steps with a NaN/inf loss (max-bad-steps = {t.max_bad_steps}), "
                f"last at step {self.iteration}; lower the lr, check the data, or resume "
                "from an earlier checkpoint"
            )

    def _save_into(self, res: TrainResult) -> None:
        tag = self.save()
        if tag:
            res.checkpoints.append(tag)

    def _l2e_metrics(self) -> dict:
        return self.l2e.metrics() if self.l2e else {}

    def _log_train(self, window: LogWindow, s: StepResult, tps: float, res: TrainResult) -> None:
        m = {
            "lm_loss": float(np.mean(window.loss)) if window.loss else float("nan"),
            "lr": s.lr,
            "tokens_per_s": tps,
            "step_time_s": float(np.mean(window.time)) if window.time else 0.0,
            "consumed_samples": self.consumed,
            "skipped_steps": res.skipped_steps,
        }
        if window.l2e:
            m["l2e_loss"] = float(np.mean(window.l2e))
        if window.gn and self.cfg.logging.log_grad_norm:
            m["grad_norm"] = float(np.mean(window.gn))
        m.update(wall_clock_timings(self.engine))  # wall-clock-breakdown: the last step's timers
        if self.cfg.precision_name == "fp16":
            m["loss_scale"] = float(getattr(self.engine.optimizer, "cur_scale", float("nan")))
        if self.cfg.logging.log_param_norm:
            sq = torch.zeros((), dtype=torch.float64, device=self.ps.device)
            for p in self.module.parameters():
                sq += p.detach().double().pow(2).sum()
            m["param_norm"] = float(sq.sqrt())
        l2e = self._l2e_metrics()  # every rank (metrics may reduce across ranks)
        res.l2e_metrics = l2e
        for layer, d in l2e.items():
            for k, v in d.items():
                m[f"l2e_train/layer{layer}/{k}"] = v
        self.monitor.log("train", self.iteration, m)

    def _validate(self, res: TrainResult) -> None:
        rec = self.validator.run(self.iteration)
        if rec is None:
            return
        res.valid_losses.append((rec.iteration, rec.loss))
        if self.heldout_tokens is not None:
            res.heldout_metrics = rec.heldout
            res.heldout_history.append((rec.iteration, rec.heldout))


@dataclass
class StepTimer:
    """Wall-clock time of the timed steps: every step but the first of a run (warm-up), unless it is the only one."""

    start_iteration: int
    train_iters: int
    steps: int = 0
    total: float = 0.0

    def add(self, iteration: int, dt: float) -> None:
        """``iteration``: the step count after the step that took ``dt`` seconds."""
        if iteration > self.start_iteration + 1 or self.train_iters - self.start_iteration == 1:
            self.steps += 1
            self.total += dt

    def mean_or(self, dt: float) -> float:
        return self.total / self.steps if self.steps else dt


def train(
    cfg: NeoXConfig, datasets=None, vocab_size: Optional[int] = None, ps=None, quiet: bool = False, stream=None
) -> TrainResult:
    """Build everything from the config and train; returns a TrainResult (every rank)."""
    trainer = Trainer(cfg, datasets=datasets, vocab_size=vocab_size, ps=ps, quiet=quiet, stream=stream)
    return trainer.train()
