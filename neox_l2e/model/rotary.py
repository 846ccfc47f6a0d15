"""Partial rotary position embeddings, non-interleaved (rotate-half), as GPT-NeoX / Pythia use them."""

from __future__ import annotations

import torch
import torch.nn as nn


class RotaryEmbedding(nn.Module):
    """cos/sin tables for the first ``rot_dims`` dims of each head (rot_dims = rotary_pct * head_dim)."""

    def __init__(self, rot_dims: int, base: int = 10000, device=None):
        super().__init__()
        self.rot_dims = rot_dims
        inv_freq = 1.0 / (base ** (torch.arange(0, rot_dims, 2, dtype=torch.float32, device=device) / rot_dims))
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # fp32 always (see _apply)

    def _apply(self, fn, recurse=True):
        """inv_freq follows device moves but stays fp32: ``model.bfloat16()`` would round it (at head size 64,
        position 2047, cos/sin off by up to 0.36), and the tables are computed in fp32 before the cast to the
        activations' dtype (as GPT-NeoX keeps its rotary caches in fp32)."""
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        if self.inv_freq is not None and self.inv_freq.dtype != torch.float32:
            self.inv_freq = inv_freq.to(device=self.inv_freq.device)
        return self

    def forward(self, seq_len: int, device, dtype) -> tuple:
        t = torch.arange(seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq.to(device))  # [s, rot/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [s, rot]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [b, heads, s, head_dim]; rotates the first cos.shape[-1] dims, passes the rest through."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x_rot = x_rot * cos + rotate_half(x_rot) * sin
    return torch.cat((x_rot, x_pass), dim=-1)
