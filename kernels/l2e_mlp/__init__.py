"""Fused MLP up-projection + GELU + L2E statistics/loss (Triton), beside its torch reference.

    z, loss_sum, n_sel, (count, bmean, bm2) = fused_up_gelu_l2e(
        x [T, h], weight [N, h], bias [N] | None, mean [N] fp32, inv_var [N] fp32, tau, eps,
        approximate="none" | "tanh", mode="split" | "fused-gemm", *, l2e_grad_to_input=True)

z [T, N] (x.dtype, differentiable), loss_sum fp32 0-dim (differentiable), n_sel int64 0-dim,
count fp32 0-dim (= T), bmean/bm2 [N] fp32 moments of z's fp32 value. l2e_grad_to_input=False keeps
loss_sum's gradient off x (W and b still get it). Under autocast x, W, b are cast as F.linear casts them.
Design: docs/kernels.md.
Set TRITON_INTERPRET=1 before importing triton to run the kernels on CPU tensors (slow; tests only).
"""

from .ops import (
    GPU_CONFIG,
    INTERPRET_CONFIG,
    FusedUpGeluL2E,
    KernelConfig,
    default_config,
    fused_up_gelu_l2e,
    interpreter_enabled,
    triton_usable,
)
from .reference import l2e_mlp_reference

__all__ = [
    "fused_up_gelu_l2e",
    "l2e_mlp_reference",
    "KernelConfig",
    "FusedUpGeluL2E",
    "default_config",
    "GPU_CONFIG",
    "INTERPRET_CONFIG",
    "interpreter_enabled",
    "triton_usable",
]
