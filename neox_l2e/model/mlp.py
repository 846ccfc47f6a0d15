"""The MLP block of a GPT-NeoX layer: h -> 4h (column-parallel) -> GELU -> h (row-parallel).

The up-projection's op (what ``dense_h_to_4h`` applies to its TP-prepared input and weight shard) is chosen once,
when the MLP is built:

- ``GELUUp``: z = GELU(x W^T + b), the plain Pythia MLP;
- ``InhibitedUp`` (the layer is inhibited): z from the layer's inhibitor (neox_l2e.l2e.NeuronInhibitor), which
  computes the same z and, beside it, the monosemanticity statistics, the selection and the inhibition loss, in
  plain torch or in the fused Triton kernel (neox_l2e.kernels.l2e_mlp).

Both run inside ``ColumnParallelLinear.forward(x, op=...)``, so the TP input/weight handling is the same on either
path. ``MLP.up_op`` is the module whose output is z [b, s, 4h/tp] (post-GELU, after inhibition): analysis code
reads activations with ``mlp.up_op.register_forward_hook``. The model's ``l2e`` controller is what the training
loop talks to; the inhibitor's state stays under ``...mlp.inhibitor.*`` in the state_dict.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..parallel import ColumnParallelLinear, ParallelState, RowParallelLinear


class GELUUp(nn.Module):
    """The plain up-projection op: z = GELU(x W^T + b). Holds no state."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.approximate = approximate  # "tanh" (NeoX bias-gelu-fusion) or "none" (exact erf)

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return F.gelu(F.linear(x, weight, bias), approximate=self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


class InhibitedUp(GELUUp):
    """The inhibited up-projection op: z = inhibitor(x, W, b, approximate) (same z as GELUUp; MEmeL reflects its
    top-k in training), plus the inhibitor's statistics, selection and loss.

    The inhibitor is registered on the MLP (its buffers are ``...mlp.inhibitor.*``), not here: this module keeps
    a plain reference, so it adds no state_dict keys."""

    def __init__(self, inhibitor: nn.Module, approximate: str = "none"):
        super().__init__(approximate)
        self.__dict__["_inhibitor"] = inhibitor  # unregistered: the MLP owns it

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return _run_eagerly(self._inhibitor, x, weight, bias, self.approximate)


@torch.compiler.disable
def _run_eagerly(inhibitor: nn.Module, x, weight, bias, approximate: str) -> torch.Tensor:
    """The inhibitor's forward, never traced by torch.compile (a graph break in a compiled model): it keeps
    Python-side state between forward and commit (the pending micro-batch, the phase) and, on CUDA, launches the
    fused kernel, which is itself compiler-disabled."""
    return inhibitor(x, weight, bias, approximate)


class MLP(nn.Module):
    """h -> 4h -> GELU -> h. ``inhibitor``: the layer's inhibitor when the layer is inhibited (L2E / MEmeL), else
    None (the plain Pythia MLP)."""

    def __init__(
        self,
        hidden_size: int,
        ffn_size: int,
        ps: ParallelState,
        approximate: str = "none",
        dtype=None,
        inhibitor: Optional[nn.Module] = None,
    ):
        super().__init__()
        self.dense_h_to_4h = ColumnParallelLinear(hidden_size, ffn_size, ps, bias=True, dtype=dtype)
        self.dense_4h_to_h = RowParallelLinear(ffn_size, hidden_size, ps, bias=True, dtype=dtype)
        self.approximate = approximate
        self.inhibitor = inhibitor  # a submodule when set: state_dict keys ...mlp.inhibitor.*
        self.up_op = GELUUp(approximate) if inhibitor is None else InhibitedUp(inhibitor, approximate)

    def __setattr__(self, name: str, value) -> None:
        if name in ("inhibitor", "up_op") and "up_op" in self._modules:
            raise AttributeError(f"MLP.{name} is chosen when the MLP is built: pass inhibitor= to MLP(...)")
        super().__setattr__(name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [b, s, h]
        z = self.dense_h_to_4h(x, op=self.up_op)  # [b, s, 4h/tp]
        return self.dense_4h_to_h(z)  # [b, s, h]
