"""The torch reference of ``fused_up_gelu_l2e``: a thin wrapper of ``neox_l2e.l2e.torch_op`` (the one torch
implementation of the L2E forward, shared with the inhibitor's torch backend and tools/bench_kernels.py).

    u        = x W^T + b                       (fp32 from the upcast x, W, b; see ``round_preact``)
    z32      = GELU(u)                         (fp32)
    selected = phi(z32) >= tau
    loss_sum = sum over selected of log((z32 - mean)^2 + eps)
    (count, bmean, bm2) = batch moments of z32
    z        = z32 cast to x.dtype

Plain autograd gives the gradients (of z and loss_sum w.r.t. x, weight, bias).
"""

from __future__ import annotations

from neox_l2e.l2e.torch_op import check_args as _check_args  # noqa: F401  (ops.py validates with it)
from neox_l2e.l2e.torch_op import l2e_mlp_torch


def l2e_mlp_reference(
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
    round_preact: bool = False,
    grad_to_input: bool = True,
):
    """Same signature and returns as ``fused_up_gelu_l2e``; ``mode`` is checked and ignored.

    round_preact=False (default): u = x W^T + b in fp32 from the upcast operands.
    round_preact=True: that value rounded once to x.dtype, the pre-activation both Triton modes use (see
    docs/kernels.md); identical for fp32 inputs. grad_to_input=False: the loss's gradient stops at x.
    """
    return l2e_mlp_torch(
        x,
        weight,
        bias,
        mean,
        inv_var,
        tau,
        eps,
        approximate,
        mode,
        preact="rounded" if round_preact else "fp32",
        grad_to_input=grad_to_input,
    )
