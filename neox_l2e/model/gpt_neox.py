"""The Pythia / GPT-NeoX model, readable in one sitting.

    tokens [b, s] -> embed_in -> N x Layer -> final_layer_norm -> embed_out -> logits [b, s, V/tp]

Layer (parallel residual, Pythia):  out = x + attn(ln1(x)) + mlp(ln2(x))
Layer (sequential residual):        h = x + attn(ln1(x));  out = h + mlp(ln2(h))
Attention: one fused QKV projection laid out per head as [q_h, k_h, v_h]; partial rotary on the
first rotary_pct * head_dim dims of q and k; causal torch scaled_dot_product_attention (sdpa-backend: torch's
choice of kernel, or one forced).
Tensor parallelism splits heads, the MLP width and the vocabulary (neox_l2e.parallel); parameter
names follow Hugging Face GPTNeoX so checkpoints convert by name.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from ..config import DEFAULT_SEED, NeoXConfig
from ..parallel import (
    ColumnParallelLinear,
    ParallelState,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_to_tp,
    gather_from_tp,
    init_sharded_,
    vocab_parallel_cross_entropy,
)
from .mlp import MLP
from .rotary import RotaryEmbedding, apply_rotary

SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


def _sdpa_kernel(name: str):
    """The context that limits scaled_dot_product_attention to one kernel (sdpa-backend), or none for "auto"."""
    return contextlib.nullcontext() if name == "auto" else sdpa_kernel([SDPA_BACKENDS[name]])


class Attention(nn.Module):
    def __init__(self, cfg: NeoXConfig, ps: ParallelState, dtype=None):
        super().__init__()
        m = cfg.model
        self.heads = m.num_attention_heads // ps.tp  # heads on this rank
        self.head_dim = cfg.head_dim
        self.dropout = m.attention_dropout
        self.rng = ps.rng  # TP-rank-specific stream for dropout
        self.query_key_value = ColumnParallelLinear(
            m.hidden_size, 3 * m.hidden_size, ps, bias=m.use_bias_in_attn_linear, dtype=dtype
        )
        self.dense = RowParallelLinear(m.hidden_size, m.hidden_size, ps, bias=m.use_bias_in_attn_linear, dtype=dtype)
        self.sdpa_backend = m.sdpa_backend  # "auto": torch picks the kernel; else only that one (sdpa_kernel)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        qkv = self.query_key_value(x)  # [b, s, 3 * heads * hd]
        qkv = qkv.view(b, s, self.heads, 3 * self.head_dim).transpose(1, 2)  # [b, heads, s, 3 hd]
        q, k, v = qkv.split(self.head_dim, dim=-1)  # each [b, heads, s, hd]
        # q and k come out of the rotary as new tensors; v is a view of qkv, and attention saves v for its
        # backward: copied to its own storage, v no longer keeps the whole qkv (3x its size) alive until the
        # backward (2/3 of qkv per layer, the activation memory we kept above Hugging Face's)
        q, k, v = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v.contiguous()
        p = self.dropout if self.training else 0.0
        with _sdpa_kernel(self.sdpa_backend):
            if p > 0.0:
                with self.rng.fork():  # this rank's heads: own dropout stream
                    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
            else:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(b, s, self.heads * self.head_dim)  # [b, s, h/tp]
        return self.dense(y)  # [b, s, h]


class Layer(nn.Module):
    def __init__(self, cfg: NeoXConfig, ps: ParallelState, dtype=None, inhibitor: Optional[nn.Module] = None):
        super().__init__()
        m = cfg.model
        self.parallel_residual = m.gpt_j_residual
        self.tied_norm = m.gpt_j_tied
        self.input_layernorm = nn.LayerNorm(
            m.hidden_size, eps=m.layernorm_epsilon, bias=m.use_bias_in_norms, device=ps.device, dtype=dtype
        )
        self.post_attention_layernorm = nn.LayerNorm(
            m.hidden_size, eps=m.layernorm_epsilon, bias=m.use_bias_in_norms, device=ps.device, dtype=dtype
        )
        self.attention = Attention(cfg, ps, dtype)
        self.mlp = MLP(
            m.hidden_size, cfg.ffn_size, ps, approximate=cfg.gelu_approximate, dtype=dtype, inhibitor=inhibitor
        )
        self.dropout = nn.Dropout(m.hidden_dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ln1 = self.input_layernorm(x)
        attn = self.dropout(self.attention(ln1, cos, sin))
        if self.parallel_residual:
            ln2 = ln1 if self.tied_norm else self.post_attention_layernorm(x)
            return x + attn + self.dropout(self.mlp(ln2))
        h = x + attn
        return h + self.dropout(self.mlp(self.post_attention_layernorm(h)))


class ModelOutput(NamedTuple):
    """The forward's result. A tuple, so that DeepSpeed finds its tensors: the engine registers its backward
    hooks (the backward prologue: wall-clock timers, ZeRO's backward bookkeeping) on the tensors of a
    tuple, list or dict output, and on none of a plain object's."""

    logits: torch.Tensor  # [b, s, V/tp] (this rank's vocab slice)
    l2e_loss: Optional[torch.Tensor]  # model.l2e.loss(): the reduced L2E loss (None when no layer is active)


class GPTNeoX(nn.Module):
    def __init__(
        self,
        cfg: NeoXConfig,
        ps: Optional[ParallelState] = None,
        vocab_size: Optional[int] = None,
        dtype: Optional[torch.dtype] = None,
        init: bool = True,
        seed: int = DEFAULT_SEED,
    ):
        """``seed`` draws the initial weights and, when ``ps.rng`` is not seeded yet, the dropout streams (the
        trainer passes training.seed); ``init=False`` leaves the weights for a checkpoint to fill."""
        super().__init__()
        ps = ps or ParallelState.single()
        m = cfg.model
        self.cfg, self.ps = cfg, ps
        self.vocab_size = cfg.padded_vocab_size(ps.tp, vocab_size)  # padded, global
        self.base_vocab_size = cfg.padded_vocab_size(1, vocab_size)  # padded for TP=1; rows past it are inert
        if not ps.rng.seeded:
            ps.rng.seed(seed, ps.tp_rank, shared=False)  # TP-rank dropout stream (parallel/random.py)
        self.gradient_checkpointing = m.checkpoint_activations
        self.checkpoint_num_layers = m.checkpoint_num_layers
        self.gpt_neox = nn.Module()  # HF naming: gpt_neox.*
        self.gpt_neox.embed_in = VocabParallelEmbedding(self.vocab_size, m.hidden_size, ps, dtype=dtype)
        self.gpt_neox.emb_dropout = nn.Dropout(m.hidden_dropout)
        inhibitors = self._build_inhibitors()
        self.gpt_neox.layers = nn.ModuleList(Layer(cfg, ps, dtype, inhibitors.get(i)) for i in range(m.num_layers))
        self.gpt_neox.final_layer_norm = nn.LayerNorm(
            m.hidden_size, eps=m.layernorm_epsilon, bias=m.use_bias_in_norms, device=ps.device, dtype=dtype
        )
        self.tied = not m.no_weight_tying
        if not self.tied:
            self.embed_out = ColumnParallelLinear(m.hidden_size, self.vocab_size, ps, bias=False, dtype=dtype)
        rot_dims = int(cfg.head_dim * m.rotary_pct)
        self.rotary = RotaryEmbedding(rot_dims, m.rotary_emb_base, device=ps.device)
        # a plain attribute (not a submodule): the inhibitors' state stays under ...mlp.inhibitor.*
        self.l2e = self._build_controller()
        if init and ps.device.type != "meta":
            self.init_weights(seed)

    # ---------------------------------------------------------------- L2E
    def _build_inhibitors(self) -> dict:
        """{layer index: inhibitor} for the inhibited layers (empty when L2E is off); each MLP is built with its
        own, which chooses its up-projection op once."""
        if not self.cfg.l2e_active:
            return {}
        from ..l2e import NeuronInhibitor

        n = self.cfg.ffn_size // self.ps.tp
        return {i: NeuronInhibitor(n, self.cfg.l2e, self.ps, layer_index=i) for i in self.cfg.inhibited_layers()}

    def _build_controller(self):
        """The model's L2E controller (``self.l2e``, what the training loop talks to: begin_step, loss_term,
        end_micro_batch, metrics)."""
        from ..l2e import L2EController

        e = self.cfg.l2e
        return L2EController(self.inhibitors(), e.l2e_lambda, e.l2e_loss_reduction)

    def inhibitors(self) -> list:
        return [layer.mlp.inhibitor for layer in self.gpt_neox.layers if layer.mlp.inhibitor is not None]

    # ---------------------------------------------------------------- init
    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """NeoX init methods, drawn for the full (unsharded) tensors so every TP degree gets the same model."""
        m = self.cfg.model
        L, h = m.num_layers, m.hidden_size
        inner = _init_fn(m.init_method, m.init_method_std, L, h)
        outer = _init_fn(m.output_layer_init_method, m.init_method_std, L, h)
        gen = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            full = _full_shape(p, self.ps)
            if name.endswith("layernorm.weight") or name.endswith("layer_norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                fn = (
                    outer
                    if (name.endswith("attention.dense.weight") or name.endswith("dense_4h_to_h.weight"))
                    else inner
                )
                rows = self.base_vocab_size if name.endswith(("embed_in.weight", "embed_out.weight")) else None
                init_sharded_(p, full, getattr(p, "tp_partition_dim", None), self.ps, fn, gen, init_rows=rows)

    # ---------------------------------------------------------------- forward
    def forward(self, tokens: torch.Tensor) -> ModelOutput:
        # tokens: [b, s]
        s = tokens.shape[1]
        x = self.gpt_neox.emb_dropout(self.gpt_neox.embed_in(tokens))  # [b, s, h]
        cos, sin = self.rotary(s, x.device, x.dtype)  # [s, rot]
        layers = self.gpt_neox.layers
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            n = self.checkpoint_num_layers
            # eager: the recomputation replays the TP dropout stream (ps.rng). Compiled: torch's own checkpoint
            # (a context_fn cannot run under compile; attention dropout, the stream's one user, is refused with
            # compile and checkpointing at config load)
            ctx = {} if torch.compiler.is_compiling() else {"context_fn": self.ps.rng.checkpoint_contexts}
            for start in range(0, len(layers), n):
                x = checkpoint(_run_layers, layers[start : start + n], x, cos, sin, use_reentrant=False, **ctx)
        else:
            x = _run_layers(layers, x, cos, sin)
        x = self.gpt_neox.final_layer_norm(x)
        if self.tied:
            logits = F.linear(copy_to_tp(x, self.ps), self.gpt_neox.embed_in.weight)
        else:
            logits = self.embed_out(x)  # [b, s, V/tp]
        # no inhibited layer: no eager call, so a compiled forward is one graph
        return ModelOutput(logits, _l2e_loss(self.l2e) if self.l2e.inhibitors else None)

    def lm_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy (fp32); logits may be vocab-parallel."""
        return vocab_parallel_cross_entropy(logits, labels, self.ps, vocab_limit=self.base_vocab_size).mean()

    def full_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Gather the vocab-parallel logits to [b, s, V] (inference, tests); V = the vocab padded for TP=1."""
        return gather_from_tp(logits, self.ps)[..., : self.base_vocab_size]

    def num_parameters(self) -> int:
        """Parameters of the whole (unsharded) model at this TP degree. Not TP-independent: the vocab-parallel
        embedding matrices are counted with this degree's vocab padding (a multiple of make-vocab-size-divisible-by
        x tp), so above TP=1 each adds (padded(tp) - padded(1)) x hidden-size inert zero rows to the count (Pythia:
        128 rows each at TP=2); every other parameter counts the same at any degree."""
        return sum(math.prod(_full_shape(p, self.ps)) for p in self.parameters())


@torch.compiler.disable
def _l2e_loss(controller) -> Optional[torch.Tensor]:
    """controller.loss(), run eagerly under torch.compile: it reads the loss tensors the inhibitors (themselves run
    eagerly) stored on the Python side during this forward."""
    return controller.loss()


def _run_layers(layers, x, cos, sin):
    for layer in layers:
        x = layer(x, cos, sin)
    return x


def _full_shape(p: torch.Tensor, ps: ParallelState) -> tuple:
    shape = list(p.shape)
    dim = getattr(p, "tp_partition_dim", None)
    if dim is not None:
        shape[dim] *= ps.tp
    return tuple(shape)


def _init_fn(method: str, std: float, num_layers: int, hidden: int):
    """NeoX init methods as fn(tensor, generator) filling a 2-D tensor in place."""
    if method == "normal":
        sigma = std
    elif method == "scaled_normal":
        sigma = std / math.sqrt(2.0 * num_layers)
    elif method == "small_init":
        sigma = math.sqrt(2.0 / (5.0 * hidden))
    elif method == "wang_init":
        sigma = 2.0 / num_layers / math.sqrt(hidden)
    elif method in ("xavier_normal", "xavier_uniform"):

        def xavier(t, gen):
            fan_out, fan_in = t.shape[0], t.shape[-1]
            bound = math.sqrt(2.0 / (fan_in + fan_out))
            if method == "xavier_normal":
                t.normal_(0.0, bound, generator=gen)
            else:
                a = math.sqrt(3.0) * bound
                t.uniform_(-a, a, generator=gen)

        return xavier
    else:  # validated at config load
        raise ValueError(f"unknown init method {method!r}")
    return lambda t, gen: t.normal_(0.0, sigma, generator=gen)
