"""The MLP block of a GPT-NeoX layer: h -> 4h (column-parallel) -> GELU -> h (row-parallel).

When the layer is inhibited, the up-projection + bias + GELU is handed to ``self.inhibitor`` (built by
neox_l2e.l2e.NeuronInhibitor), which computes the same z and, beside it, the monosemanticity statistics,
the selection and the inhibition loss — in plain torch, or in the fused Triton kernel
(neox_l2e.kernels.l2e_mlp). The model's ``l2e`` controller is what the training loop talks to.
With no inhibitor the forward is exactly the plain Pythia MLP.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..parallel import ColumnParallelLinear, ParallelState, RowParallelLinear


class MLP(nn.Module):
    def __init__(self, hidden_size: int, ffn_size: int, ps: ParallelState, approximate: str = "none", dtype=None):
        super().__init__()
        self.dense_h_to_4h = ColumnParallelLinear(hidden_size, ffn_size, ps, bias=True, dtype=dtype)
        self.dense_4h_to_h = RowParallelLinear(ffn_size, hidden_size, ps, bias=True, dtype=dtype)
        self.approximate = approximate  # "tanh" (NeoX bias-gelu-fusion) or "none" (exact erf)
        self.inhibitor: Optional[nn.Module] = None
        # analysis hook: called with z [b, s, 4h/tp] (after GELU / inhibition) when set (tools/ms_scan.py, fkr.py)
        self.capture: Optional[Callable[[torch.Tensor], None]] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [b, s, h]
        x = self.dense_h_to_4h.scatter_input(x)
        up = self.dense_h_to_4h
        if self.inhibitor is not None:
            z = self.inhibitor(x, up.weight, up.bias, self.approximate)  # [b, s, 4h/tp]
        else:
            z = F.gelu(F.linear(x, up.weight, up.bias), approximate=self.approximate)
        if self.capture is not None:
            self.capture(z)
        return self.dense_4h_to_h(z)  # [b, s, h]
