"""The trainer's evaluation policy: when to evaluate, the validation loss and the held-out monosemanticity.

    layers = heldout_layers(cfg)                 # ms-heldout-layers resolved (a ConfigError before anything is built)
    tokens = heldout_tokens(cfg, datasets)       # the fixed held-out token set, or None
    v = Validator(cfg, ps, datasets, engine, inhibitors, monitor, layers, tokens)
    v.should_evaluate(iteration) -> bool         # every eval-interval steps (the final evaluation is the loop's)
    v.run(iteration) -> ValidRecord | None       # valid loss (+ ms_heldout metrics), logged and printed

Every rank calls ``run`` (the forwards hold the TP collectives; the loss is all-reduced).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from ..config import ConfigError, NeoXConfig


def sample_iterator(dataset, micro_batch_size, dp_rank, dp_size, consumed_samples=0):
    from ..data import SampleIterator

    return SampleIterator(dataset, micro_batch_size, dp_rank, dp_size, consumed_samples=consumed_samples)


def heldout_layers(cfg: NeoXConfig) -> list:
    """The layers ms-heldout-layers names (a ConfigError naming the key when it names none)."""
    from ..l2e import heldout as ms_heldout

    try:
        return ms_heldout.resolve_layers(cfg.l2e.ms_heldout_layers, cfg.model.num_layers, cfg.inhibited_layers())
    except ms_heldout.HeldoutError as err:
        raise ConfigError(f"{cfg.source_of('ms_heldout_layers')}: {err}") from None


def heldout_tokens(cfg: NeoXConfig, datasets) -> Optional[torch.Tensor]:
    """The fixed held-out token set (valid split, document order), or None when off or without valid data."""
    from ..l2e import heldout as ms_heldout

    n = cfg.l2e.ms_heldout_tokens
    if n == 0:
        return None
    ds = datasets.get("valid") if datasets else None
    try:
        if ds is None or len(ds) == 0:
            if n is not None:
                raise ms_heldout.HeldoutError(
                    f"ms-heldout-tokens: {n} held-out tokens requested but there is no valid "
                    "split; give valid data or set ms-heldout-tokens to 0"
                )
            return None
        return ms_heldout.heldout_tokens(ds, n)
    except ms_heldout.HeldoutError as err:
        raise ConfigError(f"{cfg.source_of('ms_heldout_tokens')}: {err}") from None


@dataclass
class ValidRecord:
    """One evaluation: the valid lm loss and, when measured, the ms_heldout metrics per layer."""

    iteration: int
    loss: float
    heldout: dict = field(default_factory=dict)  # layer -> ms_heldout metrics (empty: not measured)


class Validator:
    """Validation loss and held-out monosemanticity of one run (every rank builds one)."""

    def __init__(
        self, cfg: NeoXConfig, ps, datasets, engine, inhibitors, monitor, layers: list, tokens: Optional[torch.Tensor]
    ):
        self.cfg, self.ps, self.datasets, self.engine = cfg, ps, datasets, engine
        self.module = engine.module
        self.inhibitors, self.monitor = inhibitors, monitor
        self.heldout_layers, self.heldout_tokens = layers, tokens

    def should_evaluate(self, iteration: int) -> bool:
        """A periodic evaluation after this step: every eval-interval steps, except at the last step (the loop's
        final evaluation covers it)."""
        t = self.cfg.training
        return iteration % t.eval_interval == 0 and iteration < t.train_iters

    def _batch(self, it) -> tuple:
        tokens = next(it).to(self.ps.device, non_blocking=True).long()
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    @torch.no_grad()
    def evaluate(self, split: str = "valid") -> Optional[float]:
        """Mean lm loss over eval-iters micro-batches of the split (every rank; None without that split)."""
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
        if self.ps.world_size > 1:
            dist.all_reduce(total)
        return float(total[0] / total[1])

    @torch.no_grad()
    def measure_heldout(self) -> Optional[dict]:
        """ms_heldout metrics of every measured layer on the fixed set (neox_l2e.l2e.heldout); every rank calls it
        (the forwards hold the TP collectives). None when the measurement is off."""
        if self.heldout_tokens is None:
            return None
        from ..l2e import heldout as ms_heldout

        blocks = self.module.gpt_neox.layers
        mlps = {i: blocks[i].mlp for i in self.heldout_layers}
        running = {}
        for inh in self.inhibitors:
            if inh.layer_index in mlps and float(inh.count.reshape(-1)[:1].sum()) >= 2:
                running[inh.layer_index] = ms_heldout.running_variance(inh)
        self.engine.eval()
        # it reads activations with forward hooks on the MLPs: under compile (model.compile) the forward runs
        # eagerly here, since a compiled graph does not call hooks added after it was compiled
        eager = torch.compiler.set_stance("force_eager") if self.cfg.compile_mode else contextlib.nullcontext()
        try:
            with eager:
                return ms_heldout.measure(
                    self.engine,
                    mlps,
                    self.heldout_tokens,
                    self.cfg.model.seq_length,
                    self.cfg.training.train_micro_batch_size_per_gpu,
                    self.cfg.l2e.l2e_reference_levels or [],
                    ps=self.ps,
                    running_vars=running,
                    device=self.ps.device,
                )
        finally:
            self.engine.train()

    def run(self, iteration: int) -> Optional[ValidRecord]:
        """Evaluates, logs ("valid", "ms_heldout_hist") and prints one line; None without valid data."""
        loss = self.evaluate("valid")
        if loss is None:
            return None
        record = ValidRecord(iteration, loss)
        ppl = math.exp(loss) if loss < 50 else float("inf")
        rec = {"lm_loss": loss, "ppl": ppl}
        line = f"step {iteration}: valid loss {loss:.4f} (ppl {ppl:.2f})"
        t0 = time.perf_counter()
        heldout = self.measure_heldout()
        if heldout is not None:
            from ..l2e import heldout as ms_heldout

            rec.update(ms_heldout.flat_metrics(heldout))
            rec["ms_heldout/tokens"] = self.heldout_tokens.numel()
            rec["ms_heldout/time_s"] = time.perf_counter() - t0
            record.heldout = {i: r["metrics"] for i, r in heldout.items()}
            self.monitor.log(
                "ms_heldout_hist",
                iteration,
                {"edges": ms_heldout.PHI_EDGES, **{f"layer{i}": r["hist"] for i, r in heldout.items()}},
            )
            level = (self.cfg.l2e.l2e_reference_levels or [5.0])[0]
            inhibited = {i.layer_index for i in self.inhibitors}
            line += f" | held-out phi>{level:g}: " + " ".join(
                f"L{i}{'*' if i in inhibited else ''} {r['metrics'].get(f'frac_phi_gt_{level:g}', math.nan):.2e}"
                for i, r in sorted(heldout.items())
            )
        self.monitor.log("valid", iteration, rec)
        self.monitor.print(line)
        return record
