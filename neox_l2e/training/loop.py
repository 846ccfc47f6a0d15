"""The training loop: NeoX-style steps on a DeepSpeed engine, evaluation, checkpoints, L2E hooks.

    result = train(cfg)                        # data from cfg.data (neox_l2e.data)
    result = train(cfg, datasets={...}, vocab_size=V)   # tests / tools: any datasets with {"text": [seq+1]}

One step (iteration -> iteration + 1), L2E through the model's controller ``l2e`` (neox_l2e.l2e.L2EController):
    l2e.begin_step(iteration)
    gas x { tokens [mb, seq+1] -> loss = lm + l2e.loss_term() -> engine.backward -> l2e.end_micro_batch(ok) }
    (one small device-to-host copy per micro-batch: the NaN/interrupt flags and every layer's L2E values)
    engine.step() (skipped on every rank when any rank saw a NaN/inf loss)
    lr schedule advances on applied steps; consumed samples advance always.
"""
from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..config import ConfigError, NeoXConfig
from .. import checkpoint as ckpt
from .engine import build_engine, setup_distributed, wall_clock_timings
from .faults import InterruptFlag, TrainingError, nan_steps_from_env, skipped_update
from .monitor import Monitor, fmt_count
from .schedule import AnnealingLR


@dataclass
class TrainResult:
    iteration: int = 0
    start_iteration: int = 0
    consumed_train_samples: int = 0
    train_losses: list = field(default_factory=list)      # (iteration, lm loss) for every step, NaN when skipped
    valid_losses: list = field(default_factory=list)      # (iteration, valid lm loss)
    lrs: list = field(default_factory=list)               # (iteration, lr used by that step)
    skipped_steps: int = 0                                # NaN/inf steps skipped
    overflow_steps: int = 0                               # fp16 loss-scale overflows (skipped by DeepSpeed)
    checkpoints: list = field(default_factory=list)
    tokens_per_s: float = 0.0
    elapsed_s: float = 0.0
    l2e_metrics: dict = field(default_factory=dict)       # layer -> l2e_train metrics (running stats; last logged)
    heldout_metrics: dict = field(default_factory=dict)   # layer -> ms_heldout metrics (fixed set; last evaluation)
    heldout_history: list = field(default_factory=list)   # (iteration, {layer -> ms_heldout metrics})
    interrupted: bool = False
    num_parameters: int = 0
    log_dir: Optional[str] = None


# ------------------------------------------------------------------------------------------------
# data


def sample_iterator(dataset, micro_batch_size, dp_rank, dp_size, consumed_samples=0):
    from ..data import SampleIterator
    return SampleIterator(dataset, micro_batch_size, dp_rank, dp_size, consumed_samples=consumed_samples)


def build_data(cfg: NeoXConfig, dp: int):
    """(datasets, vocab_size, tokenizer) from cfg.data through neox_l2e.data."""
    from ..data import build_datasets, build_tokenizer
    d, t = cfg.data, cfg.training
    tokenizer = None
    vocab = cfg.model.vocab_size
    if d.vocab_file:
        tokenizer = build_tokenizer(d.tokenizer_type, d.vocab_file)
        vocab = vocab or tokenizer.vocab_size
    global_batch = t.train_micro_batch_size_per_gpu * t.gradient_accumulation_steps * dp
    eval_samples = t.eval_iters * t.train_micro_batch_size_per_gpu * dp
    num_samples = {"train": t.train_iters * global_batch, "valid": eval_samples, "test": eval_samples}
    datasets = build_datasets(d, cfg.model.seq_length, t.seed, num_samples=num_samples, vocab_size=vocab,
                              data_order=cfg.data_order)
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
    def __init__(self, cfg: NeoXConfig, datasets=None, vocab_size: Optional[int] = None, ps=None,
                 loss_hook: Optional[Callable] = None, quiet: bool = False, stream=None):
        self.cfg = cfg
        t = cfg.training
        self.heldout_layers = self._heldout_layers()       # a bad layer list fails before anything is built
        self.ps = ps or setup_distributed(cfg)
        ps = self.ps
        self.save_lock = ckpt.acquire_save_lock(t.save, ps) if t.save else None   # one job per save folder
        resume_tag = ckpt.latest_tag(t.load) if t.load else None
        if resume_tag is not None:
            # a corrupted checkpoint, a config that changes the model or a layout this run cannot load fails
            # here, before the data and model are built
            ckpt.check_resume(cfg, t.load, resume_tag, ps)
        _seed_all(t.seed)
        if datasets is None:
            datasets, vocab_size, self.tokenizer = build_data(cfg, ps.dp)
        self.datasets = datasets
        self.heldout_tokens = self._heldout_tokens()
        vocab_size = vocab_size or cfg.model.vocab_size
        from ..model import GPTNeoX
        self.model = GPTNeoX(cfg, ps, vocab_size=vocab_size, seed=t.seed)
        self.num_parameters = self.model.num_parameters()
        self.finetuned_from = None
        if t.load and t.finetune:
            ckpt.load_weights_into(self.model, t.load, ps.tp_rank)
            self.finetuned_from = t.load
        elif resume_tag is not None and t.no_load_optim and cfg.zero_stage == 3:
            # ZeRO-3 restores its weights from the optimizer shards; without them, from the consolidated weights
            # (mp_rank_00_model_states.pt) before DeepSpeed partitions the model
            ckpt.load_weights_into(self.model, t.load, ps.tp_rank, tag=resume_tag)
        self.engine, self.optimizer = build_engine(cfg, self.model, ps)
        self.module = self.engine.module
        self.scheduler = AnnealingLR.from_config(self.optimizer, cfg)
        self.iteration = 0
        self.consumed = 0
        self.resumed_from = None
        if resume_tag is not None and not t.finetune:
            client = ckpt.load_checkpoint(self.engine, t.load, ps, load_optimizer=not t.no_load_optim,
                                          tag=resume_tag, layout_checked=True)   # checked above, once
            self.iteration = int(client.get("iteration", 0))
            self.consumed = int(client.get("consumed_train_samples", 0))
            if "lr_scheduler" in client:
                self.scheduler.load_state_dict(client["lr_scheduler"])
            self.resumed_from = f"{t.load}/{client['tag']}"
        self.global_batch = t.train_micro_batch_size_per_gpu * t.gradient_accumulation_steps * ps.dp
        self.tokens_per_step = self.global_batch * cfg.model.seq_length
        self.loss_hook = loss_hook
        self.nan_steps = nan_steps_from_env(ps.rank)
        self.l2e = getattr(self.module, "l2e", None) or None     # the model's L2E controller (None: no L2E)
        self.inhibitors = self.l2e.inhibitors if self.l2e else []   # read-only view (layer indices, buffers)
        self.log_dir = default_log_dir(cfg)
        self.monitor = Monitor(cfg, self.log_dir, enabled=ps.is_main and not quiet, total_iters=t.train_iters,
                               start_iter=self.iteration, stream=stream)
        self.train_iter = sample_iterator(self.datasets["train"], t.train_micro_batch_size_per_gpu, ps.dp_rank,
                                          ps.dp, consumed_samples=self.consumed)
        self.engine.train()

    # ---------------------------------------------------------------- pieces
    def header(self) -> list:
        cfg, ps = self.cfg, self.ps
        lines = [
            f"world size {ps.world_size} | layout TP {ps.tp} x DP {ps.dp} | ZeRO stage {cfg.zero_stage} | "
            f"precision {cfg.precision_name} | device {ps.device.type}",
            f"parameters {fmt_count(self.num_parameters)} ({self.num_parameters:,}) | tokens per step "
            f"{self.tokens_per_step:,} ({self.global_batch} x {cfg.model.seq_length}; micro-batch "
            f"{cfg.training.train_micro_batch_size_per_gpu} x gas {cfg.training.gradient_accumulation_steps} x DP {ps.dp})",
        ]
        l2e = (f"L2E {cfg.l2e.l2e_method} on layers {cfg.inhibited_layers()} (p = {cfg.l2e.l2e_ratio:g}, "
               f"lambda = {cfg.l2e.l2e_lambda:g})" if self.l2e else "L2E off")
        lines.append(f"train-iters {cfg.training.train_iters} | lr {cfg.lr:g} {cfg.optimizer.lr_decay_style} "
                     f"(warmup {self.scheduler.warmup_iters}, min {cfg.optimizer.min_lr:g}) | {l2e}")
        if self.heldout_tokens is not None:
            lines.append(f"held-out monosemanticity (ms_heldout/...): {self.heldout_tokens.numel():,} valid tokens, "
                         f"layers {self.heldout_layers}, at every evaluation")
        if self.resumed_from:
            lines.append(f"resumed from {self.resumed_from} at step {self.iteration} "
                         f"({self.consumed:,} samples consumed)")
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
        return {"neox_config": self.cfg.to_dict(), "iteration": self.iteration,
                "consumed_train_samples": self.consumed, "lr_scheduler": self.scheduler.state_dict(),
                "tp": self.ps.tp, "dp": self.ps.dp, "padded_vocab_size": self.module.vocab_size,
                "num_parameters": self.num_parameters}

    def save(self) -> Optional[str]:
        t = self.cfg.training
        if not t.save:
            return None
        tag = ckpt.save_checkpoint(self.engine, t.save, self.iteration, self.client_state(), self.ps,
                                   keep_last_n=t.keep_last_n_checkpoints)
        if tag:
            self.monitor.print(f"saved checkpoint {Path(t.save) / tag}")
        return tag

    def _should_save(self) -> bool:
        t = self.cfg.training
        if not t.save:
            return False
        if t.checkpoint_factor and self.iteration % t.checkpoint_factor == 0:
            return True
        return bool(t.extra_save_iters) and self.iteration in t.extra_save_iters

    @torch.no_grad()
    def evaluate(self, split: str = "valid") -> Optional[float]:
        ds = self.datasets.get(split) if self.datasets else None
        if ds is None or len(ds) == 0:
            return None
        t = self.cfg.training
        self.engine.eval()
        it = sample_iterator(ds, t.train_micro_batch_size_per_gpu, self.ps.dp_rank, self.ps.dp, 0)
        total = torch.zeros(2, dtype=torch.float64, device=self.ps.device)
        for _ in range(t.eval_iters):
            x, y = self._batch(it)
            out = self.engine(x)
            total[0] += self.module.lm_loss(out.logits, y).double()
            total[1] += 1
        self.engine.train()
        self._all_reduce(total)
        return float(total[0] / total[1])

    def train_step(self, interrupt: Optional[InterruptFlag] = None) -> dict:
        cfg, t = self.cfg, self.cfg.training
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
            loss = lm + l2e.loss_term(l2e_loss) if l2e_loss is not None else lm
            if self.iteration in self.nan_steps:
                loss = loss + float("nan")
            if self.loss_hook is not None:
                loss = self.loss_hook(self.iteration, loss)
            finite = torch.isfinite(loss.detach())
            zero = torch.zeros((), device=lm.device, dtype=torch.float32)
            flags = torch.stack([
                torch.where(finite, lm.detach().float(), zero),
                torch.where(finite, l2e_loss.detach().float(), zero) if l2e_loss is not None else zero,
                (~finite).float(),
                torch.full((), float(interrupt is not None and interrupt.set), device=lm.device),
            ])
            self._all_reduce(flags)                         # every rank decides the same thing
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
        stats = {"lr": lr, "bad": bad, "applied": applied, "stop": stop,
                 "lm_loss": lm_sum / gas if not bad else float("nan"),
                 "l2e_loss": (l2e_sum / l2e_n) if l2e_n else None}
        if applied:
            self.scheduler.step()
        gn = (own_norm if self._own_grad_norm else self.engine.get_global_grad_norm()) if applied else None
        if gn is not None:
            gn = float(gn)
            stats["grad_norm"] = gn if math.isfinite(gn) else None
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
        res = TrainResult(iteration=self.iteration, start_iteration=self.iteration,
                          consumed_train_samples=self.consumed, num_parameters=self.num_parameters,
                          log_dir=self.log_dir)
        mon = self.monitor
        mon.header(self.header())
        mon.log("run", self.iteration, {"world_size": ps.world_size, "tp": ps.tp, "dp": ps.dp,
                                        "zero_stage": cfg.zero_stage, "precision": cfg.precision_name,
                                        "num_parameters": self.num_parameters,
                                        "tokens_per_step": self.tokens_per_step,
                                        "l2e_layers": [i.layer_index for i in self.l2e.inhibitors] if self.l2e else []})
        consecutive_bad = 0
        window = {"loss": [], "l2e": [], "time": [], "gn": []}
        t_start = time.perf_counter()
        steps_timed, time_total = 0, 0.0
        mon.start_bar()
        try:
            with InterruptFlag() as interrupt:
                while self.iteration < t.train_iters:
                    t0 = time.perf_counter()
                    s = self.train_step(interrupt)
                    dt = time.perf_counter() - t0
                    if self.iteration > res.start_iteration + 1 or t.train_iters - res.start_iteration == 1:
                        steps_timed += 1                         # the first step (warm-up) is not timed
                        time_total += dt
                    res.train_losses.append((self.iteration, s["lm_loss"]))
                    res.lrs.append((self.iteration, s["lr"]))
                    if s["bad"]:
                        res.skipped_steps += 1
                        consecutive_bad += 1
                        mon.print(f"warning: step {self.iteration}: NaN/inf loss, step skipped "
                                  f"({consecutive_bad} in a row, limit max-bad-steps={t.max_bad_steps})")
                        mon.log("train", self.iteration, {"skipped": 1, "consecutive_bad_steps": consecutive_bad})
                        if consecutive_bad >= t.max_bad_steps:
                            raise TrainingError(f"{consecutive_bad} consecutive steps with a NaN/inf loss "
                                                f"(max-bad-steps = {t.max_bad_steps}), last at step "
                                                f"{self.iteration}; lower the lr, check the data, or resume "
                                                "from an earlier checkpoint")
                    else:
                        consecutive_bad = 0
                        if not s["applied"]:
                            res.overflow_steps += 1
                        window["loss"].append(s["lm_loss"])
                        if s["l2e_loss"] is not None:
                            window["l2e"].append(s["l2e_loss"])
                        if s.get("grad_norm") is not None:
                            window["gn"].append(s["grad_norm"])
                    window["time"].append(dt)
                    avg_dt = time_total / steps_timed if steps_timed else dt
                    tps = self.tokens_per_step / avg_dt if avg_dt > 0 else 0.0
                    last_loss = window["loss"][-1] if window["loss"] else float("nan")
                    mon.update_bar(self.iteration, last_loss, s["lr"], tps, avg_dt,
                                   (t.train_iters - self.iteration) * avg_dt)
                    if self.iteration % cfg.logging.log_interval == 0 or self.iteration == res.start_iteration + 1 \
                            or self.iteration == t.train_iters:
                        self._log_train(window, s, tps, res)
                        window = {"loss": [], "l2e": [], "time": [], "gn": []}
                    if self.iteration % t.eval_interval == 0 and self.iteration < t.train_iters:
                        self._log_valid(res)
                    if self._should_save() and self.iteration < t.train_iters:
                        tag = self.save()
                        if tag:
                            res.checkpoints.append(tag)
                    if s["stop"]:
                        res.interrupted = True
                        break
            if res.interrupted:
                mon.print(f"interrupted at step {self.iteration}")
                if t.save_on_interrupt and t.save:
                    tag = self.save()
                    if tag:
                        res.checkpoints.append(tag)
            else:
                self._log_valid(res)
                if t.save:
                    tag = self.save()
                    if tag:
                        res.checkpoints.append(tag)
        finally:
            mon.close()
            if self.save_lock is not None:
                self.save_lock.release()
        res.iteration, res.consumed_train_samples = self.iteration, self.consumed
        res.elapsed_s = time.perf_counter() - t_start
        res.tokens_per_s = self.tokens_per_step * steps_timed / time_total if time_total > 0 else 0.0
        return res

    def _l2e_metrics(self) -> dict:
        return self.l2e.metrics() if self.l2e else {}

    def _log_train(self, window: dict, s: dict, tps: float, res: TrainResult) -> None:
        m = {"lm_loss": float(np.mean(window["loss"])) if window["loss"] else float("nan"), "lr": s["lr"],
             "tokens_per_s": tps, "step_time_s": float(np.mean(window["time"])) if window["time"] else 0.0,
             "consumed_samples": self.consumed, "skipped_steps": res.skipped_steps}
        if window["l2e"]:
            m["l2e_loss"] = float(np.mean(window["l2e"]))
        if window["gn"] and self.cfg.logging.log_grad_norm:
            m["grad_norm"] = float(np.mean(window["gn"]))
        m.update(wall_clock_timings(self.engine))       # wall-clock-breakdown: the last step's timers
        if self.cfg.precision_name == "fp16":
            m["loss_scale"] = float(getattr(self.engine.optimizer, "cur_scale", float("nan")))
        if self.cfg.logging.log_param_norm:
            sq = torch.zeros((), dtype=torch.float64, device=self.ps.device)
            for p in self.module.parameters():
                sq += p.detach().double().pow(2).sum()
            m["param_norm"] = float(sq.sqrt())
        l2e = self._l2e_metrics()           # every rank (metrics may reduce across ranks)
        res.l2e_metrics = l2e
        for layer, d in l2e.items():
            for k, v in d.items():
                m[f"l2e_train/layer{layer}/{k}"] = v
        self.monitor.log("train", self.iteration, m)

    def _log_valid(self, res: TrainResult) -> None:
        loss = self.evaluate("valid")
        if loss is None:
            return
        res.valid_losses.append((self.iteration, loss))
        ppl = math.exp(loss) if loss < 50 else float("inf")
        rec = {"lm_loss": loss, "ppl": ppl}
        line = f"step {self.iteration}: valid loss {loss:.4f} (ppl {ppl:.2f})"
        t0 = time.perf_counter()
        heldout = self.measure_heldout()
        if heldout is not None:
            from ..l2e import heldout as H
            rec.update(H.flat_metrics(heldout))
            rec["ms_heldout/tokens"] = self.heldout_tokens.numel()
            rec["ms_heldout/time_s"] = time.perf_counter() - t0
            res.heldout_metrics = {i: r["metrics"] for i, r in heldout.items()}
            res.heldout_history.append((self.iteration, res.heldout_metrics))
            self.monitor.log("ms_heldout_hist", self.iteration,
                             {"edges": H.PHI_EDGES, **{f"layer{i}": r["hist"] for i, r in heldout.items()}})
            level = (self.cfg.l2e.l2e_reference_levels or [5.0])[0]
            inhibited = {i.layer_index for i in self.inhibitors}
            line += f" | held-out phi>{level:g}: " + " ".join(
                f"L{i}{'*' if i in inhibited else ''} {r['metrics'].get(f'frac_phi_gt_{level:g}', math.nan):.2e}"
                for i, r in sorted(heldout.items()))
        self.monitor.log("valid", self.iteration, rec)
        self.monitor.print(line)

    # ---------------------------------------------------------------- held-out monosemanticity
    def _heldout_layers(self) -> list:
        """The layers ms-heldout-layers names (a ConfigError naming the key when it names none)."""
        from ..l2e import heldout as H
        cfg = self.cfg
        try:
            return H.resolve_layers(cfg.l2e.ms_heldout_layers, cfg.model.num_layers, cfg.inhibited_layers())
        except H.HeldoutError as err:
            raise ConfigError(f"{cfg.source_of('ms_heldout_layers')}: {err}") from None

    def _heldout_tokens(self) -> Optional[torch.Tensor]:
        """The fixed held-out token set (valid split, document order), or None when off or without valid data."""
        from ..l2e import heldout as H
        cfg = self.cfg
        n = cfg.l2e.ms_heldout_tokens
        if n == 0:
            return None
        ds = self.datasets.get("valid") if self.datasets else None
        try:
            if ds is None or len(ds) == 0:
                if n is not None:
                    raise H.HeldoutError(f"ms-heldout-tokens: {n} held-out tokens requested but there is no valid "
                                         "split; give valid data or set ms-heldout-tokens to 0")
                return None
            return H.heldout_tokens(ds, n)
        except H.HeldoutError as err:
            raise ConfigError(f"{cfg.source_of('ms_heldout_tokens')}: {err}") from None

    @torch.no_grad()
    def measure_heldout(self) -> Optional[dict]:
        """ms_heldout metrics of every measured layer on the fixed set (neox_l2e.l2e.heldout); every rank calls it
        (the forwards hold the TP collectives). None when the measurement is off."""
        if self.heldout_tokens is None:
            return None
        from ..l2e import heldout as H
        blocks = self.module.gpt_neox.layers
        mlps = {i: blocks[i].mlp for i in self.heldout_layers}
        running = {}
        for inh in self.inhibitors:
            if inh.layer_index in mlps and float(inh.count.reshape(-1)[:1].sum()) >= 2:
                running[inh.layer_index] = H.running_variance(inh)
        self.engine.eval()
        try:
            return H.measure(self.engine, mlps, self.heldout_tokens, self.cfg.model.seq_length,
                             self.cfg.training.train_micro_batch_size_per_gpu, self.cfg.l2e.l2e_reference_levels or [],
                             ps=self.ps, running_vars=running, device=self.ps.device)
        finally:
            self.engine.train()


def train(cfg: NeoXConfig, datasets=None, vocab_size: Optional[int] = None, ps=None,
          loss_hook: Optional[Callable] = None, quiet: bool = False, stream=None) -> TrainResult:
    """Build everything from the config and train; returns a TrainResult (every rank)."""
    trainer = Trainer(cfg, datasets=datasets, vocab_size=vocab_size, ps=ps, loss_hook=loss_hook, quiet=quiet,
                      stream=stream)
    return trainer.train()
