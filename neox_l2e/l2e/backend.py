"""The L2E forward backends: one callable with the fused op's contract, chosen once when the inhibitor is built.

    backend = choose_backend(cfg.l2e_backend, device)
    r = backend(x2d, weight, bias, mean, inv_var, tau, eps, approximate, grad_to_input=True)   # torch_op.L2EForward

``torch``: ``torch_op.up_gelu_l2e`` (returns phi and the selection too; MEmeL's top-k and the reuse of a
selection by a checkpointing recompute are arguments of this backend only). ``triton``: the fused kernel
(``neox_l2e.kernels.l2e_mlp.fused_up_gelu_l2e``; phi and the mask stay on the chip, so they are None).
``auto``: triton when the model is built for a CUDA device and the kernel imports, torch otherwise.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from typing import Optional

import torch

from .torch_op import L2EForward, up_gelu_l2e


class TorchBackend:
    """The plain PyTorch path (the reference)."""

    name = "torch"
    returns_phi = True

    def __call__(
        self,
        x,
        weight,
        bias,
        mean,
        inv_var,
        tau: Optional[float],
        eps: float,
        approximate: str,
        *,
        grad_to_input: bool = True,
        moments: bool = True,
        score: bool = True,
        **torch_only,
    ) -> L2EForward:
        """``torch_only``: ``top_k``, ``selection``, ``level_bound``, ``gather`` of ``up_gelu_l2e``."""
        return up_gelu_l2e(
            x,
            weight,
            bias,
            mean,
            inv_var,
            tau,
            eps,
            approximate,
            grad_to_input=grad_to_input,
            moments=moments,
            score=score,
            **torch_only,
        )


class TritonBackend:
    """The fused Triton op (one pass: z, moments, selection count and loss partial sums)."""

    name = "triton"
    returns_phi = False

    def __init__(self, op):
        self.op = op

    def __call__(
        self,
        x,
        weight,
        bias,
        mean,
        inv_var,
        tau: Optional[float],
        eps: float,
        approximate: str,
        *,
        grad_to_input: bool = True,
        moments: bool = True,
        score: bool = True,
    ) -> L2EForward:
        z, loss_sum, n_sel, mom = self.op(
            x,
            weight,
            bias,
            mean,
            inv_var,
            math.inf if tau is None else tau,
            eps,
            approximate,
            l2e_grad_to_input=grad_to_input,
        )
        return L2EForward(z=z, loss_sum=loss_sum, n_sel=n_sel, moments=mom if moments else None)


def _triton_op():
    """The fused op, or the reason it cannot be used."""
    if importlib.util.find_spec("triton") is None:
        return None, ImportError("triton is not installed")
    try:
        from neox_l2e.kernels.l2e_mlp import fused_up_gelu_l2e
    except Exception as err:  # noqa: BLE001 - any import failure falls back
        return None, err
    return fused_up_gelu_l2e, None


def choose_backend(name: str, device: Optional[torch.device]):
    """The backend for config value ``name`` (auto | torch | triton; validated by the config loader) on
    ``device`` (where the model is built). A kernel that cannot be imported falls back to torch with a warning."""
    name = str(name).lower()
    use_triton = name == "triton" or (name == "auto" and device is not None and torch.device(device).type == "cuda")
    if not use_triton:
        return TorchBackend()
    op, err = _triton_op()
    if op is None:
        warnings.warn(f"L2E: the Triton kernel could not be imported ({err!r}); using the torch backend.", stacklevel=2)
        return TorchBackend()
    return TritonBackend(op)
