"""Shared pieces of the tensor-parallel tests: tiny configs, deterministic weights, TP=1 references."""

from __future__ import annotations

import torch

from neox_l2e.checkpoint.tp_states import merge_tp_states, split_tp_state
from neox_l2e.config import build_config
from neox_l2e.model import GPTNeoX
from neox_l2e.parallel import ParallelState

VOCAB = 100  # padded to 104 at TP=1 and 112 at TP=2 (make-vocab-size-divisible-by 8): the paddings differ


def tiny_cfg(**extra):
    keys = dict(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        seq_length=16,
        vocab_size=VOCAB,
        rotary_pct=0.25,
        gpt_j_residual=True,
        bias_gelu_fusion=True,
        no_weight_tying=True,
        make_vocab_size_divisible_by=8,
        init_method="small_init",
        output_layer_init_method="wang_init",
        seed=7,
        train_micro_batch_size_per_gpu=2,
    )
    keys.update(extra)
    return build_config(keys)


def random_full_state(cfg, seed: int = 0) -> dict:
    """A TP=1 state where every parameter (biases and norms too) is random, so nothing is trivially 0 or 1."""
    model = GPTNeoX(cfg, ParallelState.single())
    gen = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    for k, v in state.items():
        if v.is_floating_point() and ".inhibitor." not in k:
            state[k] = v + 0.1 * torch.randn(v.shape, generator=gen)
    return state


def tokens(cfg, batch: int = 2, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, cfg.model.seq_length + 1), generator=gen)


def tp_model(cfg, ps, full_state) -> GPTNeoX:
    model = GPTNeoX(cfg, ps)
    model.load_state_dict(split_tp_state(full_state, cfg, ps.tp)[ps.tp_rank])
    return model


def grads_of(model) -> dict:
    return {
        k: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)) for k, p in model.named_parameters()
    }


def gather_states(local: dict, ps, cfg) -> dict:
    """Full state from every TP rank's local tensors (all-gathered over the TP group) via merge_tp_states."""
    import torch.distributed as dist

    parts = [None] * ps.tp
    dist.all_gather_object(parts, {k: v.cpu() for k, v in local.items()}, group=ps.tp_group)
    return merge_tp_states(parts, cfg)


# ------------------------------------------------------------------------------------------------
# training through the project's Trainer (neox_l2e.training.loop)

import os  # noqa: E402

import numpy as np  # noqa: E402

os.environ.setdefault("NEOX_L2E_DS_SHM", "0")  # no JIT build of DeepSpeed's CPU shared-memory op


class Arithmetic(torch.utils.data.Dataset):
    """Learnable sequences token[t] = (a + b t) mod VOCAB (a, b per sample), so the loss falls in a few steps."""

    def __init__(self, n: int = 256, seed: int = 0, seq: int = 16):
        g = np.random.default_rng(seed)
        a, b = g.integers(0, VOCAB, size=n), g.integers(1, 4, size=n)
        self.rows = (a[:, None] + b[:, None] * np.arange(seq + 1)[None, :]) % VOCAB

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"text": self.rows[i].astype(np.int64)}


def train_cfg(**extra):
    keys = dict(
        optimizer={"type": "Adam", "params": {"lr": 0.01, "betas": [0.9, 0.95], "eps": 1e-8}},
        min_lr=0.001,
        weight_decay=0.1,
        gradient_clipping=1.0,
        warmup=0.1,
        train_iters=6,
        lr_decay_iters=6,
        eval_interval=1000,
        eval_iters=1,
        log_interval=1,
        progress_bar=False,
        train_micro_batch_size_per_gpu=4,
    )
    keys.update(extra)
    return tiny_cfg(**keys)


def run_trainer(cfg, ps, **kw):
    """Train with the project's Trainer; returns ([(iteration, lm loss)], trainer)."""
    from neox_l2e.training.loop import Trainer

    trainer = Trainer(cfg, datasets={"train": Arithmetic()}, vocab_size=VOCAB, ps=ps, quiet=True, **kw)
    res = trainer.train()
    return res.train_losses, trainer
