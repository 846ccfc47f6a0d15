"""The torch reference of ``fused_up_gelu_l2e``, built from ``neox_l2e.l2e.functional``.

    u        = x W^T + b                       (fp32: x, W, b upcast; see ``round_preact``)
    z32      = GELU(u)                         (fp32)
    selected = phi(z32) >= tau                 (functional.select)
    loss_sum = functional.inhibition_loss_sum(z32, mean, selected, eps)
    (count, bmean, bm2) = functional.batch_moments(z32)
    z        = z32 cast to x.dtype

Plain autograd gives the gradients (of z and loss_sum w.r.t. x, weight, bias).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from neox_l2e.l2e import functional as L


def _check_args(x, weight, bias, mean, inv_var, tau, eps, approximate, mode):
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


def l2e_mlp_reference(x, weight, bias, mean, inv_var, tau: float, eps: float,
                      approximate: str = "none", mode: str = "split", *, round_preact: bool = False):
    """Same signature and returns as ``fused_up_gelu_l2e``; ``mode`` is accepted and ignored.

    round_preact=False (default): u = x W^T + b in fp32 from the upcast operands (the issue's reference).
    round_preact=True: x W^T + b (fp32 accumulation, bias added in fp32) is rounded once to x.dtype, as
    F.linear / addmm return it: the pre-activation both Triton modes use (see docs/kernels.md);
    identical for fp32 inputs.
    """
    _check_args(x, weight, bias, mean, inv_var, tau, eps, approximate, mode)
    u = x.float() @ weight.float().t()
    if bias is not None:
        u = u + bias.float()
    if round_preact:
        u = u.to(x.dtype).float()
    z32 = F.gelu(u, approximate=approximate)
    mask = L.select(z32, mean, inv_var, float(tau))
    loss_sum = L.inhibition_loss_sum(z32, mean, mask, float(eps))
    n_sel = mask.sum(dtype=torch.int64)
    count, bmean, bm2 = L.batch_moments(z32)
    return z32.to(x.dtype), loss_sum, n_sel, (count, bmean, bm2)
