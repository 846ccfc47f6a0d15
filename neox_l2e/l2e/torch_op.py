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
    ``z32``, ``phi`` and ``mask`` are None where the backend does not produce them (the Triton kernel).

    The CPU (gather) form of the torch path (``functional.scan``) gives the selection as ``sel`` (flat indices
    into [T, N]) instead of ``mask``, with ``sel_phi`` (phi at ``sel``), ``cand_phi`` (every phi >= ``cand_bound``,
    a superset of the selection, for the metrics' level counts) and ``phi_sum``; ``phi`` only when scoring without
    selecting (the batch that initialises tau)."""

    z: torch.Tensor
    loss_sum: torch.Tensor
    n_sel: torch.Tensor
    moments: Optional[tuple] = None
    z32: Optional[torch.Tensor] = None
    phi: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None
    phi_sum: Optional[torch.Tensor] = None
    sel: Optional[torch.Tensor] = None
    sel_phi: Optional[torch.Tensor] = None
    cand_phi: Optional[torch.Tensor] = None
    cand_bound: Optional[float] = None

    @property
    def selection(self) -> Optional[torch.Tensor]:
        """What a recompute of the same micro-batch reuses: ``sel`` (gather form) or ``mask`` (masked form)."""
        return self.sel if self.sel is not None else self.mask


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


def gather_form(device) -> bool:
    """The selection as gathered flat indices (CPU), or as a dense mask (elsewhere: gathering needs the selected
    count on the host, a device synchronisation per layer and forward)."""
    return torch.device(device).type == "cpu"


class _GeluInhibit(torch.autograd.Function):
    """z = GELU(u) and the L2E loss sum, whose values are computed outside (under no_grad); the backward is the
    plain GELU backward plus, on the selected entries only (flat indices ``sel``), the L2E loss's gradient or
    MEmeL's sign flip. What autograd gives through ``z32 = GELU(u.float())``, the gathered loss
    ``log((z32[sel] - mean)^2 + eps).sum()`` and ``torch.where(mask, 2 mean - z, z)``: MEmeL bit for bit; L2E up to
    one rounding on the selected entries (dz GELU'(u) + g GELU'(u) instead of (dz + g) GELU'(u), so that the plain
    part is the uninhibited layer's bits and lambda = 0 trains bit for bit like L2E off).

    u: the pre-activation (x.dtype or fp32); u_p: its copy whose gradient reaches only W and b
    (``grad_to_input=False``; the loss's gradient goes there instead of to u) or None; z: the output (x.dtype,
    already reflected for MEmeL); loss_sum: its value; d: z32[sel] - mean[sel] (L2E) or None; reflect: MEmeL."""

    @staticmethod
    def forward(ctx, u, u_p, z, loss_sum, sel, d, approximate: str, eps: float, reflect: bool):
        ctx.save_for_backward(u, sel, d)
        ctx.set_materialize_grads(False)  # an unused output gives None (no gradient), as plain autograd
        ctx.approximate, ctx.eps, ctx.reflect, ctx.split = approximate, eps, reflect, u_p is not None
        return z.view_as(z), loss_sum.view_as(loss_sum)

    @staticmethod
    def backward(ctx, dz, dloss):
        u, sel, d = ctx.saved_tensors
        u32 = u.float()
        approx = ctx.approximate
        g = None
        if d is not None and dloss is not None and sel.numel():
            # autograd through log(d * d + eps).sum(): q = dloss / (d * d + eps); d * d gives q * d twice
            q = dloss.float() / (d * d + ctx.eps)
            g = q * d + q * d
        du = du_p = None
        if ctx.needs_input_grad[0] and (dz is not None or (g is not None and not ctx.split)):
            # the plain GELU backward over the whole tensor (the bits of the uninhibited layer), then the loss's
            # part g * GELU'(u) added on the selected entries: lambda = 0 (g = 0) trains bit for bit like L2E off;
            # otherwise it equals autograd's (dz + g) * GELU'(u) up to one rounding
            du32 = gelu_backward(dz.float(), u32, approx) if dz is not None else torch.zeros_like(u32)
            du32 = du32.contiguous()
            if g is not None and not ctx.split:
                du32.view(-1).index_add_(0, sel, gelu_backward(g, u32.reshape(-1).index_select(0, sel), approx))
            if ctx.reflect and dz is not None and sel.numel():  # d(2 mean - z)/dz = -1: an exact sign flip
                flat = du32.view(-1)
                flat.put_(sel, flat.index_select(0, sel).neg_())
            du = du32.to(u.dtype)
        if ctx.split and ctx.needs_input_grad[1] and g is not None:
            du_p32 = torch.zeros_like(u32)
            du_p32.view(-1).put_(sel, gelu_backward(g, u32.reshape(-1).index_select(0, sel), approx))
            du_p = du_p32.to(u.dtype)
        return du, du_p, None, None, None, None, None, None, None


def gelu_backward(grad: torch.Tensor, u: torch.Tensor, approximate: str) -> torch.Tensor:
    """d GELU(u) / du times grad (the op autograd's GeluBackward runs)."""
    return torch.ops.aten.gelu_backward(grad, u, approximate=approximate)


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
    top_k: Optional[int] = None,
    selection: Optional[torch.Tensor] = None,
    level_bound: Optional[float] = None,
    gather: Optional[bool] = None,
) -> L2EForward:
    """The L2E forward on x [T, h]. ``tau=None``: no L2E selection (no loss: loss_sum a constant 0, n_sel 0);
    ``score``: compute phi even when not selecting (the batch that initialises tau); ``moments``: this
    batch's (count, mean, M2); ``grad_to_input=False``: the loss's gradient reaches weight and bias but not x
    (the gradient of z is unchanged).

    ``top_k`` (MEmeL, with tau None): the k largest phi are selected and reflected, z' = 2 mean - z (no loss).
    ``selection``: the selection of this micro-batch's first forward (``L2EForward.selection``), reused by the
    activation-checkpointing recompute (phi is then not computed unless ``score``). ``level_bound``: the gather
    form also returns every phi >= min(threshold, level_bound) as ``cand_phi`` (the metrics count phi > level
    on it for levels >= that bound). ``gather``: the CPU form (default on CPU, see ``gather_form``)."""
    if gather is None:
        gather = gather_form(x.device)
    if not gather:
        args = (x, weight, bias, mean, inv_var, tau, eps, approximate, preact, grad_to_input, moments, score)
        return _up_gelu_l2e_masked(*args, top_k, selection)
    u = preactivation(x, weight, bias, preact)
    with torch.no_grad():
        z32 = TF.gelu(u.detach().float(), approximate=approximate)
        select = tau is not None or top_k is not None
        fresh = select and selection is None
        if fresh or moments or score:
            sc = functional.scan(
                z32,
                mean,
                inv_var,
                tau=tau if fresh else None,
                top_k=top_k if fresh else None,
                level_bound=level_bound,
                moments=moments,
                keep_phi=score and not select,
            )
        else:
            sc = functional.Scan()
        out = L2EForward(z=None, loss_sum=None, n_sel=None, moments=sc.moments, phi=sc.phi, phi_sum=sc.phi_sum)
        z = z32.to(x.dtype)
        out.z32 = z32 if z is not z32 or top_k is None else None  # MEmeL reflects z in place (fp32: z is z32)
        loss_sum = torch.zeros((), dtype=torch.float32, device=x.device)
        sel = d = None
        if select:
            sel = selection if selection is not None else sc.sel
            out.sel_phi, out.cand_phi, out.cand_bound = sc.sel_phi, sc.cand_phi, sc.bound
            if top_k is None:  # L2E: the loss over the selected entries, in flat (row-major) order
                if selection is None:
                    d = sc.sel_d  # z32 - mean at sel, from the scan's sweep (the same bits)
                else:
                    cols = sel.remainder(z32.shape[-1])
                    d = z32.reshape(-1).index_select(0, sel) - mean.detach().index_select(0, cols)
                loss_sum = torch.log(d * d + eps).sum()
            else:  # MEmeL: reverse deactivation in the output's dtype, as functional.reverse_deactivate
                cols = sel.remainder(z32.shape[-1])
                flat = z.view(-1)
                flat.put_(sel, (2.0 * mean).to(z.dtype).index_select(0, cols) - flat.index_select(0, sel))
            out.sel = sel
            out.n_sel = torch.full((), sel.numel(), dtype=torch.int64, device=x.device)
        else:
            out.n_sel = torch.zeros((), dtype=torch.int64, device=x.device)
    if torch.is_grad_enabled() and u.requires_grad:
        u_p = None
        if d is not None and not grad_to_input and x.requires_grad:
            u_p = _ParamGradOnly.apply(u, x, weight, bias)
        empty = torch.zeros(0, dtype=torch.int64, device=x.device)
        z, loss_sum = _GeluInhibit.apply(
            u, u_p, z, loss_sum, empty if sel is None else sel, d, approximate, float(eps), top_k is not None
        )
    out.z, out.loss_sum = z, loss_sum
    return out


def _up_gelu_l2e_masked(
    x, weight, bias, mean, inv_var, tau, eps, approximate, preact, grad_to_input, moments, score, top_k, selection
) -> L2EForward:
    """The masked form (no host synchronisation): plain autograd through the full-size ops."""
    u = preactivation(x, weight, bias, preact)
    z32 = TF.gelu(u.float(), approximate=approximate)
    out = L2EForward(z=z32.to(x.dtype), loss_sum=None, n_sel=None, z32=z32)
    out.moments = functional.batch_moments(z32) if moments else None
    select = tau is not None or top_k is not None
    if score or (select and selection is None):
        out.phi = functional.phi(z32.detach(), mean, inv_var)
    out.loss_sum = torch.zeros((), dtype=torch.float32, device=x.device)
    if not select:
        out.n_sel = torch.zeros((), dtype=torch.int64, device=x.device)
        return out
    if top_k is not None:  # MEmeL
        out.mask = selection if selection is not None else functional.top_k_mask(out.phi, top_k)
        out.z = functional.reverse_deactivate(out.z, mean, out.mask)
        out.n_sel = torch.count_nonzero(out.mask)
        return out
    out.mask = selection if selection is not None else out.phi >= tau
    z_loss = z32
    if not grad_to_input and x.requires_grad and torch.is_grad_enabled():
        z_loss = TF.gelu(_ParamGradOnly.apply(u, x, weight, bias).float(), approximate=approximate)
    out.loss_sum = functional.inhibition_loss_sum(z_loss, mean, out.mask, float(eps))
    out.n_sel = torch.count_nonzero(out.mask)
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
