#!/usr/bin/env python
"""Time one training step (forward, backward, AdamW step) of our model and, side by side in the same
process, with the same threads, dtype and batch, of transformers' GPTNeoXForCausalLM built from the same
config and holding the same weights.

    python tools/bench_step.py configs/pythia/pythia-70m.yml --seq 512 --micro-batch 4 --dtype fp32

The two models are measured alternately (--rounds rounds of --steps steps each, after warm-up), and the
median over rounds of the per-round ratio HF time / our time is reported (> 1: ours is faster).

L2E overhead (the paper's efficiency table): --l2e and/or --memel time our model without inhibition and
with it (same weights, same batch, inhibitors warmed up until they select), alternately in one process,
and report the median per-round overhead over no inhibition. --mlp-layer times one MLP layer of the
config's shape instead of the whole model (e.g. the Pythia-2.8B MLP, which does not fit a small machine
as a whole model):

    python tools/bench_step.py configs/pythia/pythia-70m.yml --seq 512 --l2e --memel
    python tools/bench_step.py configs/pythia/pythia-2.8b.yml --seq 512 --micro-batch 1 --l2e --memel --mlp-layer

Activation memory (--memory): one forward and backward of each model on the same batch, with no timing, and
two deterministic counts (no sampling, no allocator): the bytes of the tensors saved for backward (deduplicated
by storage, parameters left out) and the peak of the bytes held by the tensors the step creates:

    python tools/bench_step.py configs/pythia/pythia-70m.yml --seq 512 --memory checkpoint-activations=false

Reusable pieces (e.g. for an L2E-overhead comparison in the same process):
    stats = time_steps(model, batch, n)            # -> StepStats (median_s, tokens_per_s, peak_mem_mb, ...)
    ours = build_ours(cfg, vocab, dtype, device)   # our GPTNeoX, L2E as configured
    hf = build_hf_like(cfg, vocab, ours, dtype, device)
    mem = activation_memory(model, batch)          # -> ActivationMemory (saved_bytes, peak_bytes, ...)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from neox_l2e.config.schema import L2EConfig  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TIMERS = {"wall": time.perf_counter, "cpu": time.process_time}


# ---------------------------------------------------------------------------------------------
# measuring


@dataclass
class StepStats:
    times_s: list = field(default_factory=list)
    tokens_per_step: int = 0
    peak_mem_mb: float = 0.0  # GPU: peak allocated; CPU: peak RSS growth above the start of the steps

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def mean_s(self) -> float:
        return statistics.fmean(self.times_s)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.median_s

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(median_s=self.median_s, mean_s=self.mean_s, tokens_per_s=self.tokens_per_s)
        return d


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRSS:
    """Samples the resident set size in a thread (CPU has no allocator peak statistic)."""

    def __init__(self, interval_s: float = 0.002):
        self.interval, self.base, self.peak = interval_s, 0, 0
        self._stop = threading.Event()

    def __enter__(self):
        self.base = self.peak = _rss_bytes()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_bytes())
        return False


def default_step(
    model: torch.nn.Module,
    batch: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    l2e_lambda: float = L2EConfig().l2e_lambda,
) -> torch.Tensor:
    """One training step: next-token loss (+ L2E loss and commits for our model), backward, AdamW step."""
    from neox_l2e.l2e import commit_all

    x, y = batch[:, :-1], batch[:, 1:]
    if hasattr(model, "lm_loss"):  # our GPTNeoX
        out = model(x)
        loss = model.lm_loss(out.logits, y)
        if out.l2e_loss is not None:
            loss = loss + l2e_lambda * out.l2e_loss
        loss.backward()
        commit_all(model.inhibitors())  # every layer's commit, one host copy (as the training loop)
    else:  # transformers GPTNeoXForCausalLM
        logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def time_steps(
    model: torch.nn.Module,
    batch: torch.Tensor,
    n: int,
    optimizer: Optional[torch.optim.Optimizer] = None,
    step_fn: Optional[Callable] = None,
    warmup: int = 0,
    timer: Callable[[], float] = time.perf_counter,
) -> StepStats:
    """Run `warmup` untimed then `n` timed training steps of `model` on `batch` [b, s+1]; per-step times.

    `timer`: wall clock by default; ``time.process_time`` (CPU seconds of this process, ``--timer cpu``)
    is what to use with one thread on a machine shared with other jobs, where wall time also counts the
    time slices other processes take. `optimizer` defaults to a fresh torch AdamW on model.parameters()
    (pass one to keep its state across calls); `step_fn(model, batch, optimizer)` defaults to ``default_step``.
    """
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=1e-4)
    step_fn = step_fn or default_step
    cuda = batch.is_cuda
    model.train()
    for _ in range(warmup):
        step_fn(model, batch, optimizer)
    stats = StepStats(tokens_per_step=batch.shape[0] * (batch.shape[1] - 1))
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with _PeakRSS() if not cuda else _Null() as rss:
        for _ in range(n):
            t0 = timer()
            step_fn(model, batch, optimizer)
            if cuda:
                torch.cuda.synchronize()
            stats.times_s.append(timer() - t0)
    if cuda:
        stats.peak_mem_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        stats.peak_mem_mb = (rss.peak - rss.base) / 2**20
    return stats


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------------------------------------
# activation memory, counted (deterministic on any device)


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the storages created under it that are alive, after every op: each op's outputs are
    registered (their storages held here, one reference), and a storage counts until nothing but this counter
    references it (no tensor, view, autograd saved slot or backward buffer: its use count is 1); ``peak`` is the
    largest sum seen. Storages that existed before (parameters, the batch) are not counted; gradients are (they
    are created in the backward), optimizer state is not. Work buffers inside one kernel are not seen (the same
    kernels run in both models compared). Holding the storages delays their release by at most one op, and the
    sum is taken after releasing them, so it is exact at op boundaries."""

    def __init__(self, exclude=()):
        super().__init__()
        self.held = {}  # StorageImpl address -> (storage, bytes)
        self.exclude = {st._cdata for st in exclude}
        self.current = self.peak = 0

    def _sweep(self) -> None:
        use_count = torch._C._storage_Use_Count
        for key in [k for k, (st, _) in self.held.items() if use_count(k) <= 1]:
            self.current -= self.held.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._sweep()
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = st._cdata
                if key not in self.held and key not in self.exclude and st.nbytes():
                    self.held[key] = (st, st.nbytes())
                    self.current += st.nbytes()
        self.peak = max(self.peak, self.current)
        return out

    def close(self) -> None:
        self._sweep()
        self.held.clear()


@dataclass
class ActivationMemory:
    saved_bytes: int  # bytes of the tensors saved for backward, one count per storage, parameters left out
    saved_tensors: int  # how many tensors were saved (views of one storage each counted)
    peak_bytes: int  # LiveBytes.peak over forward, loss and backward
    by_size: dict = field(default_factory=dict)  # (elements, dtype) of each saved storage's first tensor -> count


def loss_fn(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The next-token loss of ``default_step`` (+ the L2E loss for our model), without backward or step."""
    x, y = batch[:, :-1], batch[:, 1:]
    if hasattr(model, "lm_loss"):  # our GPTNeoX
        out = model(x)
        loss = model.lm_loss(out.logits, y)
        lam = getattr(getattr(model, "cfg", None), "l2e", L2EConfig()).l2e_lambda
        return loss + lam * out.l2e_loss if out.l2e_loss is not None else loss
    logits = model(input_ids=x).logits  # transformers GPTNeoXForCausalLM
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


def activation_memory(model: torch.nn.Module, batch: torch.Tensor, fn: Optional[Callable] = None) -> ActivationMemory:
    """One forward (``fn(model, batch)`` -> loss; default ``loss_fn``) and backward of ``model`` in training mode,
    counting what autograd saves and the peak of what the step holds (LiveBytes). Gradients are set to None
    before and after, so the count does not depend on earlier steps."""
    fn = fn or loss_fn
    model.train()
    model.zero_grad(set_to_none=True)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved, count, by_size = {}, 0, {}
    live = LiveBytes(exclude=[p.untyped_storage() for p in model.parameters()] + [batch.untyped_storage()])

    def pack(t):
        nonlocal count
        count += 1
        key = t.untyped_storage().data_ptr()
        if key not in params and key not in saved:
            saved[key] = t.untyped_storage().nbytes()
            k = (t.numel(), str(t.dtype).replace("torch.", ""))
            by_size[k] = by_size.get(k, 0) + 1
        return t

    with live, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(model, batch).backward()
    live.close()
    model.zero_grad(set_to_none=True)
    return ActivationMemory(sum(saved.values()), count, live.peak, by_size)


def run_memory(cfg, args, ours, hf, batch) -> int:
    """--memory: saved-for-backward bytes and peak held bytes of one step, ours and HF on the same batch; HF
    twice: without a KV cache (as timed here) and with ``use_cache`` on (its config's default: the forward
    copies k and v into a cache, and its attention reads those copies)."""
    res = {"ours": activation_memory(ours, batch)}
    if hf is not None:
        res["hf"] = activation_memory(hf, batch)
        hf.config.use_cache = True
        try:
            res["hf+cache"] = activation_memory(hf, batch)
        finally:
            hf.config.use_cache = False
    for k, m in res.items():
        print(
            f"{k:>8}: saved for backward {m.saved_bytes / 2**20:.2f} MiB ({m.saved_tensors} tensors) | "
            f"peak held in forward + backward {m.peak_bytes / 2**20:.2f} MiB"
        )
    a = res["ours"]
    for k in ("hf", "hf+cache") if hf is not None else ():
        b = res[k]
        print(
            f"ours / {k}: saved {a.saved_bytes / b.saved_bytes:.4f}, peak {a.peak_bytes / b.peak_bytes:.4f} "
            "(<= 1: ours holds no more)"
        )
        extra = {n: v - b.by_size.get(n, 0) for n, v in a.by_size.items() if v > b.by_size.get(n, 0)}
        if extra:
            print(f"saved by ours more often than by {k} ((elements, dtype): extra count): " + str(extra))
    return 0


# ---------------------------------------------------------------------------------------------
# the two models


def build_ours(cfg, vocab: int, dtype: torch.dtype, device: torch.device, weights: Optional[dict] = None):
    """Our GPTNeoX, its weights drawn from training.seed, or copied from ``weights`` (parameter name -> tensor,
    every parameter: a model built before, without drawing again)."""
    from neox_l2e.model import GPTNeoX
    from neox_l2e.parallel import ParallelState

    model = GPTNeoX(cfg, ParallelState.single(device), vocab_size=vocab, seed=cfg.training.seed, init=not weights)
    if weights:
        params = dict(model.named_parameters())
        if set(params) != set(weights):
            raise ValueError(f"weights for {sorted(set(params) ^ set(weights))[:4]} do not match the model's")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(weights[name])
    return model.to(dtype=dtype)


def build_hf_like(cfg, vocab: int, ours: torch.nn.Module, dtype: torch.dtype, device: torch.device):
    """transformers' GPTNeoXForCausalLM on the same config (sdpa attention) with our weights copied in, without
    a KV cache (``config.use_cache`` False: a training step needs none)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from neox_l2e.interop.hf import hf_config_from_neox, our_state_to_hf

    d = hf_config_from_neox(cfg, ours.vocab_size)
    d.pop("architectures", None)
    d.pop("torch_dtype", None)
    hf_cfg = GPTNeoXConfig(**d)
    hf_cfg._attn_implementation = "sdpa"
    hf = GPTNeoXForCausalLM(hf_cfg).to(device=device, dtype=dtype)
    state = our_state_to_hf(ours.state_dict())
    params = dict(hf.named_parameters())
    if "embed_out.weight" in state and "embed_out.weight" not in params and "lm_head.weight" in params:
        state["lm_head.weight"] = state.pop("embed_out.weight")  # transformers 5 calls it lm_head
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if k in params]  # buffers (rotary tables) are rebuilt by HF
    if unexpected or missing:
        raise RuntimeError(f"weight copy into the HF model failed: missing {missing[:4]}, unexpected {unexpected[:4]}")
    if cfg.model.checkpoint_activations:  # same work as ours: recompute each layer in backward
        if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # no KV cache in a training step: with use_cache (HF's default) each layer's forward copies k and v into a
    # DynamicCache that lives until the forward returns (memory and copies ours does not spend)
    hf.config.use_cache = False
    return hf


@torch.no_grad()
def max_logit_diff(ours, hf, batch) -> float:
    ours.eval()
    hf.eval()
    a = ours.full_logits(ours(batch[:, :-1]).logits).float()
    b = hf(input_ids=batch[:, :-1]).logits.float()
    v = min(a.shape[-1], b.shape[-1])
    return float((a[..., :v] - b[..., :v]).abs().max())


# ---------------------------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+", help="yml files (and key=value overrides)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: the config's)")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--steps", type=int, default=3, help="timed steps per round and model")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (ours, HF, ours, HF, ...)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--timer",
        choices=list(TIMERS),
        default="wall",
        help="wall: elapsed time; cpu: CPU time of this process (use with --threads 1 on a shared machine)",
    )
    p.add_argument("--vocab", type=int, default=None, help="vocab size when the config has none")
    p.add_argument("--no-hf", action="store_true", help="time only our model")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--l2e", action="store_true", help="time L2E (the config's layers and ratio) against no inhibition")
    p.add_argument("--memel", action="store_true", help="time MEmeL against no inhibition")
    p.add_argument("--mlp-layer", action="store_true", help="with --l2e/--memel: one MLP layer, not the model")
    p.add_argument("--memory", action="store_true", help="count activation memory (saved, peak) instead of timing")
    return p.parse_intermixed_args(argv)


# ---------------------------------------------------------------------------------------------
# L2E / MEmeL overhead


class MLPLayer(torch.nn.Module):
    """One MLP layer of the config's shape, inhibited or not, as a stand-alone model for timing."""

    def __init__(self, cfg, device, dtype, method: Optional[str]):
        super().__init__()
        from neox_l2e.l2e import NeuronInhibitor
        from neox_l2e.model.mlp import MLP
        from neox_l2e.parallel import ParallelState

        ps = ParallelState.single(device)
        inhibitor = None
        if method:
            l2e = dataclasses.replace(cfg.l2e, l2e_enabled=True, l2e_method=method)
            inhibitor = NeuronInhibitor(cfg.ffn_size, l2e, ps, layer_index=0)
        self.mlp = MLP(cfg.model.hidden_size, cfg.ffn_size, ps, approximate=cfg.gelu_approximate, inhibitor=inhibitor)
        with torch.no_grad():  # the layer's parameters are created empty: draw them (normal, std 0.02, zero biases)
            for name, p in self.mlp.named_parameters():
                if name.endswith("weight"):
                    p.normal_(0.0, 0.02)
                else:
                    p.zero_()
        self.to(device=device, dtype=dtype)

    def inhibitors(self):
        return [self.mlp.inhibitor] if self.mlp.inhibitor is not None else []


def mlp_step(model, x, optimizer, l2e_lambda: float = L2EConfig().l2e_lambda):
    """Forward, a scalar loss on the layer output (+ lambda x L_MS), backward, commits, AdamW step."""
    out = model.mlp(x)
    loss = out.float().pow(2).mean()
    inh = model.mlp.inhibitor
    if inh is not None and inh.loss is not None:
        loss = loss + l2e_lambda * inh.loss
    loss.backward()
    for i in model.inhibitors():
        i.commit()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def overhead_variants(cfg, args, vocab, dtype, device, batch):
    """{name: (model, batch, step_fn)}: 'none' plus 'l2e' / 'memel', all with the same weights."""
    methods = [None] + (["l2e"] if args.l2e else []) + (["memel"] if args.memel else [])
    out = {}
    if args.mlp_layer:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(batch.shape[0] * (batch.shape[1] - 1), cfg.model.hidden_size, generator=g).to(device, dtype)
        first = None
        for m in methods:
            torch.manual_seed(0)
            layer = MLPLayer(cfg, device, dtype, m)
            if first is None:
                first = layer
            else:
                layer.mlp.load_state_dict(first.mlp.state_dict(), strict=False)
            out[m or "none"] = (layer, x, lambda mod, b, opt: mlp_step(mod, b, opt, cfg.l2e.l2e_lambda))
        return out
    first = None
    for m in methods:
        c = cfg.replace(l2e_enabled=m is not None, l2e_method=m or "l2e")
        model = build_ours(c, vocab, dtype, device)
        if first is None:
            first = model
        else:
            model.load_state_dict(first.state_dict(), strict=False)
        out[m or "none"] = (model, batch, lambda mod, b, opt: default_step(mod, b, opt, cfg.l2e.l2e_lambda))
    return out


def run_overhead(cfg, args, vocab, dtype, device, batch) -> int:
    variants = overhead_variants(cfg, args, vocab, dtype, device, batch)
    model0 = variants["none"][0]
    what = (
        f"one MLP layer {cfg.model.hidden_size} -> {cfg.ffn_size}"
        if args.mlp_layer
        else f"{fmt_params(model0)} params, L2E layers {cfg.inhibited_layers()}"
    )
    print(
        f"config {' '.join(args.configs)} | {what} | tokens {batch.shape[0]} x {batch.shape[1] - 1} | "
        f"{args.dtype} | {device} | torch {torch.__version__} | threads {torch.get_num_threads()} | "
        f"{platform.machine()} {os.cpu_count()} cpus | p = {cfg.l2e.l2e_ratio:g} | timer {args.timer} | "
        f"activation checkpointing {'on' if cfg.model.checkpoint_activations and not args.mlp_layer else 'off'}"
    )
    timer = TIMERS[args.timer]
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, (m, _, _) in variants.items()}
    for k, (m, b, fn) in variants.items():  # warm-up until the inhibitors select (stats, then tau, then selection)
        time_steps(m, b, 0, opts[k], step_fn=fn, warmup=max(args.warmup, 3))
        if k != "none":
            states = [("active" if i.active else "inactive") for i in m.inhibitors()]
            print(f"{k:>6}: inhibitors after warm-up: {', '.join(states)}")
    names = list(variants)
    per_round = {k: [] for k in names}
    every = {k: [] for k in names}
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate who goes first
        for k in order:
            m, b, fn = variants[k]
            st = time_steps(m, b, args.steps, opts[k], step_fn=fn, timer=timer)
            per_round[k].append(st.median_s)
            every[k].extend(st.times_s)
    tokens = batch.shape[0] * (batch.shape[1] - 1)
    for k in names:
        med = statistics.median(per_round[k])
        line = (
            f"{k:>6}: median step {med * 1000:.1f} ms | {tokens / med:,.0f} tokens/s | rounds "
            + " ".join(f"{t * 1000:.0f}" for t in per_round[k])
            + " ms"
        )
        if k != "none":
            over = [100.0 * (t / t0 - 1.0) for t, t0 in zip(per_round[k], per_round["none"])]
            line += f" | overhead vs none {statistics.median(over):+.1f} % ({spread(over)}; per round: " + (
                " ".join(f"{o:+.1f}" for o in over) + ")"
            )
            # other jobs only ever add time: the fastest steps are the least disturbed
            line += f" | fastest step vs fastest none {100.0 * (min(every[k]) / min(every['none']) - 1.0):+.1f} %"
        print(line)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    from neox_l2e.config import ConfigError, load_config, parse_override

    try:
        files = [c for c in args.configs if "=" not in c]
        over = dict(parse_override(c) for c in args.configs if "=" in c)
        if args.seq:
            over.update(seq_length=args.seq, max_position_embeddings=args.seq)
        over.setdefault("train_micro_batch_size_per_gpu", args.micro_batch)
        cfg = load_config(files, over)
        vocab = args.vocab or cfg.model.vocab_size
        if vocab is None:
            raise ConfigError("the config has no vocab-size; pass --vocab")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype]
    seq = cfg.model.seq_length
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, vocab, (args.micro_batch, seq + 1), generator=g).to(device)

    if args.l2e or args.memel:
        return run_overhead(cfg, args, vocab, dtype, device, batch)
    if args.mlp_layer:
        print("error: --mlp-layer goes with --l2e and/or --memel", file=sys.stderr)
        return 2
    ours = build_ours(cfg, vocab, dtype, device)
    variants = {"ours": ours}
    if not args.no_hf:
        hf = build_hf_like(cfg, vocab, ours, dtype, device)
        diff = max_logit_diff(ours, hf, batch)
        variants["hf"] = hf
    if args.memory:
        print(
            f"config {' '.join(args.configs)} | {fmt_params(ours)} params | seq {seq} x micro-batch "
            f"{args.micro_batch} | {args.dtype} | {device} | torch {torch.__version__} | activation checkpointing "
            f"{'on (both models)' if cfg.model.checkpoint_activations else 'off'}"
        )
        return run_memory(cfg, args, ours, variants.get("hf"), batch)
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in variants.items()}
    print(
        f"config {' '.join(args.configs)} | {fmt_params(ours)} params | seq {seq} x micro-batch {args.micro_batch} | "
        f"{args.dtype} | {device} | torch {torch.__version__} | threads {torch.get_num_threads()} | "
        f"{platform.machine()} {os.cpu_count()} cpus | activation checkpointing "
        f"{'on (both models)' if cfg.model.checkpoint_activations else 'off'}"
    )
    if not args.no_hf:
        print(f"max |logit difference| ours vs HF before timing: {diff:.2e}")
    for k, m in variants.items():  # warm-up, not timed
        time_steps(m, batch, 0, opts[k], warmup=args.warmup)
    timer = TIMERS[args.timer]
    per_round = {k: [] for k in variants}
    peaks = {k: 0.0 for k in variants}
    for r in range(args.rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))  # alternate who goes first
        for k in order:
            s = time_steps(variants[k], batch, args.steps, opts[k], timer=timer)
            per_round[k].append(s.median_s)
            peaks[k] = max(peaks[k], s.peak_mem_mb)
    tokens = batch.shape[0] * seq
    for k in variants:
        med = statistics.median(per_round[k])
        print(
            f"{k:>5}: median step {med * 1000:.1f} ms | {tokens / med:,.0f} tokens/s | rounds "
            + " ".join(f"{t * 1000:.0f}" for t in per_round[k])
            + f" ms | peak mem +{peaks[k]:.0f} MiB"
        )
    if not args.no_hf:
        ratios = [h / o for o, h in zip(per_round["ours"], per_round["hf"])]
        print(
            f"ratio HF / ours (median of {len(ratios)} rounds): {statistics.median(ratios):.3f} "
            f"(per round: {' '.join(f'{x:.3f}' for x in ratios)}; > 1 means ours is faster)"
        )
    return 0


def spread(values) -> str:
    """'IQR a to b, min-max c to d' of per-round overheads in percent."""
    v = sorted(values)
    q = statistics.quantiles(v, n=4) if len(v) >= 2 else [v[0], v[0], v[0]]
    return f"IQR {q[0]:+.1f} to {q[2]:+.1f}, min-max {v[0]:+.1f} to {v[-1]:+.1f}"


def fmt_params(model) -> str:
    n = model.num_parameters()
    return f"{n / 1e6:.1f}M"


if __name__ == "__main__":
    sys.exit(main())
