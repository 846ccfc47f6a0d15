"""Host side of the fused MLP up-projection + GELU + L2E: launch configs, wrappers, the autograd.Function."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace
from typing import Optional

import torch

from .reference import _check_args, l2e_mlp_reference


def interpreter_enabled() -> bool:
    """Triton's interpreter is on (it must be set in the environment before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_usable(device: torch.device) -> bool:
    """Can the Triton kernels run on tensors of ``device``? CUDA: compiled; CPU: only under the interpreter."""
    if device.type == "cuda":
        return not interpreter_enabled()
    if device.type == "cpu":
        return interpreter_enabled()
    return False


@dataclass(frozen=True)
class KernelConfig:
    """Fixed launch configurations (no autotuning: it needs a driver, and the partials buffers' shape
    depends on BLOCK_M). GPU values are not timed (no GPU in the session that wrote them); they are the
    largest tiles that compile for sm_90 without register spills and with a pipelined GEMM main loop
    (checked ahead of time, without a GPU, by ``python -m neox_l2e.kernels.l2e_mlp.aot_check``)."""
    # "split" epilogue pass and the backward elementwise pass: [BLOCK_M, BLOCK_N] tiles
    ew_block_m: int = 128
    ew_block_n: int = 64
    ew_warps: int = 8
    # "fused-gemm" forward (128 x 128 spills registers in the erf epilogue)
    mm_block_m: int = 128
    mm_block_n: int = 64
    mm_block_k: int = 64
    mm_group_m: int = 8
    mm_warps: int = 8
    mm_stages: int = 3
    # statistics merge
    merge_block_p: int = 16
    merge_block_n: int = 128
    # keep the pre-activation for backward (True) or recompute it there with the forward's GEMM (False)
    save_preact: bool = True
    # compiled CUDA only: the loss's log through lg2.approx (fast_logf) rather than the accurate logf
    fast_log: bool = True


GPU_CONFIG = KernelConfig()
# under the interpreter every program costs milliseconds: few, large tiles
INTERPRET_CONFIG = KernelConfig(ew_block_m=64, ew_block_n=64, mm_block_m=64, mm_block_n=64, mm_block_k=64,
                                merge_block_p=64, merge_block_n=128)


def default_config() -> KernelConfig:
    return INTERPRET_CONFIG if interpreter_enabled() else GPU_CONFIG


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _kernels():
    from . import _triton  # imported lazily: importing triton must follow TRITON_INTERPRET
    return _triton


def _mm_config(cfg: KernelConfig, dtype: torch.dtype) -> KernelConfig:
    if dtype == torch.float32 and not interpreter_enabled():  # fp32 tiles take twice the shared memory
        return replace(cfg, mm_block_k=min(cfg.mm_block_k, 32))
    return cfg


def _bf16_rne(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and interpreter_enabled()


def _input_precision(dtype: torch.dtype):
    """tl.dot's input_precision: fp32 GEMMs like torch's (TF32 only where torch itself would use it);
    16-bit operands keep Triton's default (None); the interpreter's fp32-cast bf16 path is exact."""
    if interpreter_enabled():
        return "ieee"
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return None


def _gemm_launch(x, weight, bias, u_lin, z, mean, inv_var, parts, tau, eps, approx_tanh, save_u, epilogue,
                 cfg: KernelConfig):
    K = _kernels()
    T, h = x.shape
    N = weight.shape[0]
    cfg = _mm_config(cfg, x.dtype)
    grid = (_cdiv(T, cfg.mm_block_m) * _cdiv(N, cfg.mm_block_n),)
    dummy = mean
    pmean, pm2, psel, ploss = parts if parts is not None else (dummy, dummy, dummy, dummy)
    K._gemm_fwd_kernel[grid](
        x, weight, bias if bias is not None else dummy, u_lin if u_lin is not None else dummy,
        z if z is not None else dummy, mean, inv_var, pmean, pm2, psel, ploss,
        T, N, h, x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), float(tau), float(eps),
        HAS_BIAS=bias is not None, SAVE_U=save_u, EPILOGUE=epilogue, APPROX_TANH=approx_tanh,
        BF16_RNE=_bf16_rne(x.dtype),
        DOT_FP32=interpreter_enabled() and x.dtype == torch.bfloat16,
        INPUT_PRECISION=_input_precision(x.dtype), FAST_LOG=cfg.fast_log and not interpreter_enabled(),
        EVEN_M=T % cfg.mm_block_m == 0,
        EVEN_N=N % cfg.mm_block_n == 0, EVEN_K=h % cfg.mm_block_k == 0, GROUP_M=cfg.mm_group_m,
        BLOCK_M=cfg.mm_block_m, BLOCK_N=cfg.mm_block_n, BLOCK_K=cfg.mm_block_k,
        num_warps=cfg.mm_warps, num_stages=cfg.mm_stages)


def _forward(x, weight, bias, mean, inv_var, tau, eps, approx_tanh, mode, cfg: KernelConfig):
    """Returns z, loss_sum, n_sel, count, bmean, bm2, u_lin (None unless saved)."""
    K = _kernels()
    T, _ = x.shape
    N = weight.shape[0]
    dev = x.device
    z = torch.empty((T, N), dtype=x.dtype, device=dev)
    if mode == "split":
        bm, bn = cfg.ew_block_m, cfg.ew_block_n
    else:
        bm, bn = cfg.mm_block_m, cfg.mm_block_n
    P, Q = _cdiv(T, bm), _cdiv(N, bn)
    pmean = torch.empty((P, N), dtype=torch.float32, device=dev)
    pm2 = torch.empty((P, N), dtype=torch.float32, device=dev)
    psel = torch.empty((P, Q), dtype=torch.int32, device=dev)
    ploss = torch.empty((P, Q), dtype=torch.float32, device=dev)
    if mode == "split":
        u_lin = _linear(x, weight, bias)  # cuBLAS, fp32 accumulation, x.dtype out: read once below
        K._split_fwd_kernel[(P, Q)](
            u_lin, z, mean, inv_var, pmean, pm2, psel, ploss,
            T, N, float(tau), float(eps), APPROX_TANH=approx_tanh,
            BF16_RNE=_bf16_rne(x.dtype), FAST_LOG=cfg.fast_log and not interpreter_enabled(),
            EVEN_M=T % bm == 0, EVEN_N=N % bn == 0,
            BLOCK_M=bm, BLOCK_N=bn, num_warps=cfg.ew_warps)
        if not cfg.save_preact:
            u_lin = None
    else:
        u_lin = torch.empty((T, N), dtype=x.dtype, device=dev) if cfg.save_preact else None
        _gemm_launch(x, weight, bias, u_lin, z, mean, inv_var, (pmean, pm2, psel, ploss), tau, eps,
                     approx_tanh, save_u=cfg.save_preact, epilogue=True, cfg=cfg)
    bmean = torch.empty((N,), dtype=torch.float32, device=dev)
    bm2 = torch.empty((N,), dtype=torch.float32, device=dev)
    K._merge_moments_kernel[(_cdiv(N, cfg.merge_block_n),)](
        pmean, pm2, bmean, bm2, T, N, P, BLOCK_M=bm, BLOCK_P=cfg.merge_block_p, BLOCK_N=cfg.merge_block_n)
    # fixed-shape torch reductions of tiny buffers: deterministic
    loss_sum = ploss.sum(dtype=torch.float64).to(torch.float32)
    n_sel = psel.sum(dtype=torch.int64)
    count = torch.full((), float(T), dtype=torch.float32, device=dev)
    return z, loss_sum, n_sel, count, bmean, bm2, u_lin


def _linear(x, weight, bias):
    """x W^T + b in x.dtype with one rounding: the call F.linear makes (same bits as the plain MLP)."""
    return torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())


def _recompute_preact(x, weight, bias, mode, cfg: KernelConfig):
    """The forward's x W^T + b in x.dtype, by the same routine the forward used (same bits)."""
    if mode == "split":
        return _linear(x, weight, bias)
    T, N = x.shape[0], weight.shape[0]
    u_lin = torch.empty((T, N), dtype=x.dtype, device=x.device)
    _gemm_launch(x, weight, bias, u_lin, None, torch.empty(1, dtype=torch.float32, device=x.device),
                 torch.empty(1, dtype=torch.float32, device=x.device), None, 1.0, 0.0, False,
                 save_u=True, epilogue=False, cfg=cfg)
    return u_lin


def _backward_du(u_lin, need_db, dz, g, mean, inv_var, tau, eps, approx_tanh, cfg: KernelConfig):
    """dL/du [T, N] in u_lin.dtype (u_lin: the pre-activation, bias included) and, when need_db, db
    (fp32 [N])."""
    K = _kernels()
    T, N = u_lin.shape
    bm, bn = cfg.ew_block_m, cfg.ew_block_n
    P, Q = _cdiv(T, bm), _cdiv(N, bn)
    du = torch.empty_like(u_lin)
    pdb = torch.empty((P, N), dtype=torch.float32, device=u_lin.device) if need_db else mean
    K._bwd_kernel[(P, Q)](
        u_lin, dz if dz is not None else u_lin,
        g if g is not None else mean, mean, inv_var, du, pdb, T, N,
        dz.stride(0) if dz is not None else 0, dz.stride(1) if dz is not None else 0, float(tau), float(eps),
        NEED_DB=need_db, HAS_DZ=dz is not None, HAS_G=g is not None,
        APPROX_TANH=approx_tanh,
        BF16_RNE=_bf16_rne(u_lin.dtype), EVEN_M=T % bm == 0, EVEN_N=N % bn == 0,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=cfg.ew_warps)
    db = pdb.sum(dim=0) if need_db else None
    return du, db


def _device_guard(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


class FusedUpGeluL2E(torch.autograd.Function):
    """z = GELU(x W^T + b) with the L2E loss, selection count and batch moments; gradients for x, W, b."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, inv_var, tau, eps, approximate, mode, cfg):
        approx_tanh = approximate == "tanh"
        with _device_guard(x):
            z, loss_sum, n_sel, count, bmean, bm2, u_lin = _forward(
                x, weight, bias, mean, inv_var, tau, eps, approx_tanh, mode, cfg)
        ctx.save_for_backward(x, weight, bias, mean, inv_var, u_lin)
        ctx.tau, ctx.eps, ctx.approx_tanh, ctx.mode, ctx.cfg = tau, eps, approx_tanh, mode, cfg
        ctx.mark_non_differentiable(n_sel, count, bmean, bm2)
        ctx.set_materialize_grads(False)
        return z, loss_sum, n_sel, count, bmean, bm2

    @staticmethod
    def backward(ctx, dz, dloss, *_unused):
        x, weight, bias, mean, inv_var, u_lin = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if (dz is None and dloss is None) or not (need_x or need_w or need_b):
            return (None,) * 10
        g = dloss.detach().to(torch.float32).reshape(()) if dloss is not None else None
        with _device_guard(x):
            if u_lin is None:
                u_lin = _recompute_preact(x, weight, bias, ctx.mode, ctx.cfg)
            du, db = _backward_du(u_lin, need_b and bias is not None, dz, g, mean, inv_var, ctx.tau, ctx.eps,
                                  ctx.approx_tanh, ctx.cfg)
        dx = du @ weight if need_x else None        # cuBLAS through torch
        dw = du.t() @ x if need_w else None
        db = db.to(bias.dtype) if need_b else None
        return dx, dw, db, None, None, None, None, None, None, None


@torch.compiler.disable  # runs eagerly inside a compiled model (a graph break), never traced by dynamo
def fused_up_gelu_l2e(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      mean: torch.Tensor, inv_var: torch.Tensor, tau: float, eps: float,
                      approximate: str = "none", mode: str = "split", *,
                      config: Optional[KernelConfig] = None, save_preact: Optional[bool] = None):
    """Fused MLP up-projection + GELU + L2E on one tensor-parallel shard of neurons.

    Returns ``z, loss_sum, n_sel, (count, bmean, bm2)``; see the package docstring. ``config`` overrides
    the launch configuration (tests use small tiles); ``save_preact`` overrides ``config.save_preact``
    (True: keep the pre-activation x W^T for backward; False: recompute it there with the forward's GEMM).
    Inside ``torch.compile`` the call is a graph break (the kernels run eagerly; dynamo does not trace them).
    Tensors the kernels cannot run on (CPU without TRITON_INTERPRET=1) go through the torch
    implementation of the same contract (``l2e_mlp_reference(..., round_preact=True)``).
    """
    _check_args(x, weight, bias, mean, inv_var, tau, eps, approximate, mode)
    if not triton_usable(x.device):
        return l2e_mlp_reference(x, weight, bias, mean, inv_var, tau, eps, approximate, mode, round_preact=True)
    cfg = config if config is not None else default_config()
    if save_preact is not None and save_preact != cfg.save_preact:
        cfg = replace(cfg, save_preact=bool(save_preact))
    mean = mean.detach().contiguous()
    inv_var = inv_var.detach().contiguous()
    if bias is not None:
        bias = bias.contiguous()
    z, loss_sum, n_sel, count, bmean, bm2 = FusedUpGeluL2E.apply(
        x, weight, bias, mean, inv_var, float(tau), float(eps), approximate, mode, cfg)
    return z, loss_sum, n_sel, (count, bmean, bm2)
