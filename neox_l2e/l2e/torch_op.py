"""The one torch implementation of the MLP up-projection + GELU + L2E forward.

The inhibitor's torch backend, the fused kernel's reference (``kernels/l2e_mlp/reference.py``) and the kernel
benchmark all call ``up_gelu_l2e``; ``fused_up_gelu_l2e`` (Triton) has the same contract as ``l2e_mlp_torch``:

    z, loss_sum, n_sel, (count, bmean, bm2) = l2e_mlp_torch(x [T, h], weight [N, h], bias [N] | None,
                                                           mean [N] fp32, inv_var [N] fp32, tau, eps, approximate)

    u        = x W^T + b                         (``preact``: see below)
    z32      = GELU(u)                           (fp32)
    selected = phi(z32) >= tau                   (functional.phi)
    loss_sum = sum over selected of log((z32 - mean)^2 + eps)
    (count, bmean, bm2) = functional.batch_moments(z32)
    z        = z32 cast to x.dtype

Imports nothing from training/ (kernels may import it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as TF

from . import functional

PREACTS = ("linear", "fp32", "rounded")


def check_args(x, weight, bias, mean, inv_var, tau, eps, approximate, mode="split") -> None:
    """Validate the fused op's arguments (one ValueError naming the argument)."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"expected x [T, h] and weight [N, h], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.shape[0] < 1:
        raise ValueError("x has no rows")
    n = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must be [{n}], got {tuple(bias.shape)}")
    for name, t in (("mean", mean), ("inv_var", inv_var)):
        if tuple(t.shape) != (n,) or t.dtype != torch.float32:
            raise ValueError(f"{name} must be fp32 [{n}], got {t.dtype} {tuple(t.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or weight.dtype != x.dtype:
        raise ValueError(f"x and weight must share one of fp32/fp16/bf16, got {x.dtype} and {weight.dtype}")
    if bias is not None and bias.dtype != x.dtype:
        raise ValueError(f"bias dtype {bias.dtype} != x dtype {x.dtype}")
    if not float(tau) > 0.0:
        raise ValueError(f"tau must be > 0 (math.inf selects nothing), got {tau}")
    if not float(eps) >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    if mode not in ("split", "fused-gemm"):
        raise ValueError(f"mode must be 'split' or 'fused-gemm', got {mode!r}")


class _ParamGradOnly(torch.autograd.Function):
    """u unchanged in the forward; in the backward its gradient reaches weight and bias only, not x."""

    @staticmethod
    def forward(ctx, u, x, weight, bias):
        ctx.save_for_backward(x)
        ctx.w_dtype = weight.dtype
        ctx.b_dtype = bias.dtype if bias is not None else None
        return u.view_as(u)

    @staticmethod
    def backward(ctx, du):
        (x,) = ctx.saved_tensors
        dw = (du.t() @ x.to(du.dtype)).to(ctx.w_dtype)
        db = du.sum(0).to(ctx.b_dtype) if ctx.b_dtype is not None else None
        return None, None, dw, db


@dataclass
class L2EForward:
    """What one forward computes. ``n_sel`` is int64 0-dim; ``moments`` is (count, bmean, bm2) or None;
    ``z32``, ``phi`` and ``mask`` are None where the backend does not produce them (the Triton kernel)."""

    z: torch.Tensor
    loss_sum: torch.Tensor
    n_sel: torch.Tensor
    moments: Optional[tuple] = None
    z32: Optional[torch.Tensor] = None
    phi: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None


def preactivation(x, weight, bias, preact: str = "linear") -> torch.Tensor:
    """u = x W^T + b. ``linear``: F.linear in x.dtype (the plain MLP's bits); ``fp32``: fp32 from the upcast
    operands; ``rounded``: the fp32 value rounded once to x.dtype (what both Triton modes use)."""
    if preact == "linear":
        return TF.linear(x, weight, bias)
    u = x.float() @ weight.float().t()
    if bias is not None:
        u = u + bias.float()
    if preact == "rounded":
        u = u.to(x.dtype).float()
    elif preact != "fp32":
        raise ValueError(f"preact must be one of {PREACTS}, got {preact!r}")
    return u


def up_gelu_l2e(
    x,
    weight,
    bias,
    mean,
    inv_var,
    tau: Optional[float],
    eps: float,
    approximate: str = "none",
    *,
    preact: str = "linear",
    grad_to_input: bool = True,
    moments: bool = True,
    score: bool = True,
) -> L2EForward:
    """The L2E forward on x [T, h]. ``tau=None``: no selection (no mask, loss_sum a constant 0, n_sel 0);
    ``score``: compute phi even when not selecting (the batch that initialises tau); ``moments``: this
    batch's (count, mean, M2); ``grad_to_input=False``: the loss's gradient reaches weight and bias but not x
    (the gradient of z is unchanged)."""
    u = preactivation(x, weight, bias, preact)
    z32 = TF.gelu(u.float(), approximate=approximate)
    out = L2EForward(z=z32.to(x.dtype), loss_sum=None, n_sel=None, z32=z32)
    out.moments = functional.batch_moments(z32) if moments else None
    if tau is not None or score:
        out.phi = functional.phi(z32.detach(), mean, inv_var)
    if tau is None:
        out.loss_sum = torch.zeros((), dtype=torch.float32, device=x.device)
        out.n_sel = torch.zeros((), dtype=torch.int64, device=x.device)
        return out
    out.mask = out.phi >= tau
    z_loss = z32
    if not grad_to_input and x.requires_grad and torch.is_grad_enabled():
        z_loss = TF.gelu(_ParamGradOnly.apply(u, x, weight, bias).float(), approximate=approximate)
    out.loss_sum = functional.inhibition_loss_sum(z_loss, mean, out.mask, float(eps))
    out.n_sel = out.mask.sum(dtype=torch.int64)
    return out


def l2e_mlp_torch(
    x,
    weight,
    bias,
    mean,
    inv_var,
    tau: float,
    eps: float,
    approximate: str = "none",
    mode: str = "split",
    *,
    preact: str = "linear",
    grad_to_input: bool = True,
):
    """``fused_up_gelu_l2e``'s contract in torch: ``z, loss_sum, n_sel, (count, bmean, bm2)``; ``mode`` is
    checked and ignored."""
    check_args(x, weight, bias, mean, inv_var, tau, eps, approximate, mode)
    r = up_gelu_l2e(
        x, weight, bias, mean, inv_var, float(tau), eps, approximate, preact=preact, grad_to_input=grad_to_input
    )
    return r.z, r.loss_sum, r.n_sel, r.moments
