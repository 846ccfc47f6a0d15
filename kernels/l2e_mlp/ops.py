"""Host side of the fused MLP up-projection + GELU + L2E: launch configs, wrappers, the autograd.Function."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field, replace
from typing import Iterator, List, Optional

import torch
from torch.autograd.function import once_differentiable

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
    merge_block_n: int = 32  # the widest column block; halved (down to merge_min_block_n) while the grid is
    merge_min_programs: int = 128  # smaller than this: 128 programs at N = 2048 (70M), N / 32 from N = 4096 on
    merge_min_block_n: int = 16
    merge_block_r: int = 1024  # program 0's chunk when it reduces the P x Q loss / count partials
    # keep the pre-activation for backward (True) or recompute it there with the forward's GEMM (False)
    save_preact: bool = True
    # compiled CUDA only: the loss's log through lg2.approx (fast_logf) rather than the accurate logf
    fast_log: bool = True


GPU_CONFIG = KernelConfig()
# under the interpreter every program costs milliseconds: few, large tiles
INTERPRET_CONFIG = KernelConfig(
    ew_block_m=64,
    ew_block_n=64,
    mm_block_m=64,
    mm_block_n=64,
    mm_block_k=64,
    merge_block_p=64,
    merge_block_n=128,
    merge_min_programs=0,
)


def default_config() -> KernelConfig:
    return INTERPRET_CONFIG if interpreter_enabled() else GPU_CONFIG


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _kernels():
    from . import _triton  # imported lazily: importing triton must follow TRITON_INTERPRET

    return _triton


# Compile options every kernel of this package is launched with. FP fusion (contracting a*b + c into one fma) is
# off: the backward recomputes z and the selection phi >= tau from the saved pre-activation, and only
# operation-by-operation IEEE rounding makes that recomputation bitwise the forward's in every kernel whatever
# the compiler's fusion heuristics (which depend on use counts; Triton 3.10 also flips the default).
COMPILE_OPTIONS = {"enable_fp_fusion": False}


@dataclass
class Launch:
    """One kernel launch: the ``_triton`` kernel's name, the grid, every argument by name (runtime values and
    constexprs) and the compile options. The ahead-of-time check compiles exactly these (``record_launches``)."""

    kernel: str
    grid: tuple
    args: dict
    options: dict = field(default_factory=dict)


_RECORDING: Optional[List[Launch]] = None


@contextlib.contextmanager
def record_launches() -> Iterator[List[Launch]]:
    """Inside the block, kernel launches are appended to the yielded list instead of run: the host code
    (variant selection, shapes, flags) runs as usual, typically on ``meta`` tensors (``fused_up_gelu_l2e`` takes
    the kernel path here whatever the device, never the torch fallback). Not thread-safe."""
    global _RECORDING
    prev, _RECORDING = _RECORDING, []
    try:
        yield _RECORDING
    finally:
        _RECORDING = prev


def _launch(kernel: str, grid: tuple, options: dict, **args) -> None:
    launch = Launch(kernel, grid, args, {**options, **COMPILE_OPTIONS})
    if _RECORDING is not None:
        _RECORDING.append(launch)
        return
    getattr(_kernels(), kernel)[grid](**launch.args, **launch.options)


def _mm_config(cfg: KernelConfig, dtype: torch.dtype, h: int, N: int, interp: Optional[bool] = None) -> KernelConfig:
    """The fused-gemm tiles for this call, compiled: fp32 halves BLOCK_K (its tiles take twice the shared
    memory); h or N not divisible by 16 (rows not 16-byte aligned: no asynchronous copies, so no pipelined
    main loop, and one address per element) halves BLOCK_M, which keeps those variants free of spills."""
    if interpreter_enabled() if interp is None else interp:
        return cfg
    if dtype == torch.float32:
        cfg = replace(cfg, mm_block_k=min(cfg.mm_block_k, 32))
    if h % 16 or N % 16:
        cfg = replace(cfg, mm_block_m=max(16, cfg.mm_block_m // 2))
    return cfg


def _merge_block_n(cfg: KernelConfig, N: int) -> int:
    """BLOCK_N of the statistics merge: ``merge_block_n`` halved while the grid (one program per BLOCK_N columns)
    has fewer than ``merge_min_programs`` programs, not below ``merge_min_block_n``. A function of N and the
    config only, so a given shape always reduces in the same order (bitwise reproducible)."""
    bn = cfg.merge_block_n
    while bn // 2 >= cfg.merge_min_block_n and _cdiv(N, bn) < cfg.merge_min_programs:
        bn //= 2
    return bn


def _ew_tile(cfg: KernelConfig, N: int, interp: Optional[bool] = None):
    """[BLOCK_M, BLOCK_N] of the element-wise passes. A row length N not divisible by 16 (rows not 16-byte
    aligned: no vector loads, one 64-bit address per element) halves BLOCK_M when compiled, which keeps those
    variants free of register spills (checked by aot_check)."""
    if N % 16 != 0 and not (interpreter_enabled() if interp is None else interp):
        return max(16, cfg.ew_block_m // 2), cfg.ew_block_n
    return cfg.ew_block_m, cfg.ew_block_n


def _bf16_rne(dtype: torch.dtype, interp: bool) -> bool:
    return dtype == torch.bfloat16 and interp


def _input_precision(dtype: torch.dtype, interp: bool):
    """tl.dot's input_precision: fp32 GEMMs like torch's (TF32 only where torch itself would use it);
    16-bit operands keep Triton's default (None); the interpreter's fp32-cast bf16 path is exact."""
    if interp:
        return "ieee"
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return None


def _gemm_launch(
    x, weight, bias, u_lin, z, mean, inv_var, parts, tau, eps, approx_tanh, save_u, epilogue, cfg: KernelConfig
):
    T, h = x.shape
    N = weight.shape[0]
    interp = interpreter_enabled()  # read once per call (an environment lookup)
    cfg = _mm_config(cfg, x.dtype, h, N, interp)
    grid = (_cdiv(T, cfg.mm_block_m) * _cdiv(N, cfg.mm_block_n),)
    dummy = mean
    pmean, pm2, psel, ploss = parts if parts is not None else (dummy, dummy, dummy, dummy)
    _launch(
        "_gemm_fwd_kernel",
        grid,
        dict(num_warps=cfg.mm_warps, num_stages=cfg.mm_stages),
        x_ptr=x,
        w_ptr=weight,
        bias_ptr=bias if bias is not None else dummy,
        u_ptr=u_lin if u_lin is not None else dummy,
        z_ptr=z if z is not None else dummy,
        mean_ptr=mean,
        inv_var_ptr=inv_var,
        pmean_ptr=pmean,
        pm2_ptr=pm2,
        psel_ptr=psel,
        ploss_ptr=ploss,
        M=T,
        N=N,
        K=h,
        stride_xm=x.stride(0),
        stride_xk=x.stride(1),
        stride_wn=weight.stride(0),
        stride_wk=weight.stride(1),
        tau=float(tau),
        eps=float(eps),
        HAS_BIAS=bias is not None,
        SAVE_U=save_u,
        EPILOGUE=epilogue,
        APPROX_TANH=approx_tanh,
        BF16_RNE=_bf16_rne(x.dtype, interp),
        DOT_FP32=interp and x.dtype == torch.bfloat16,
        INPUT_PRECISION=_input_precision(x.dtype, interp),
        FAST_LOG=cfg.fast_log and not interp,
        EVEN_M=T % cfg.mm_block_m == 0,
        EVEN_N=N % cfg.mm_block_n == 0,
        EVEN_K=h % cfg.mm_block_k == 0,
        GROUP_M=cfg.mm_group_m,
        BLOCK_M=cfg.mm_block_m,
        BLOCK_N=cfg.mm_block_n,
        BLOCK_K=cfg.mm_block_k,
    )


def _forward(x, weight, bias, mean, inv_var, tau, eps, approx_tanh, mode, cfg: KernelConfig):
    """Returns z, loss_sum, n_sel, count, bmean, bm2, u_lin (None unless saved)."""
    T, _ = x.shape
    N = weight.shape[0]
    dev = x.device
    interp = interpreter_enabled()  # read once per call (an environment lookup)
    z = torch.empty((T, N), dtype=x.dtype, device=dev)
    if mode == "split":
        bm, bn = _ew_tile(cfg, N, interp)
    else:
        mm = _mm_config(cfg, x.dtype, x.shape[1], N, interp)
        bm, bn = mm.mm_block_m, mm.mm_block_n
    P, Q = _cdiv(T, bm), _cdiv(N, bn)
    pmean = torch.empty((P, N), dtype=torch.float32, device=dev)
    pm2 = torch.empty((P, N), dtype=torch.float32, device=dev)
    psel = torch.empty((P, Q), dtype=torch.int32, device=dev)
    ploss = torch.empty((P, Q), dtype=torch.float32, device=dev)
    if mode == "split":
        u_lin = _linear(x, weight, bias)  # cuBLAS, fp32 accumulation, x.dtype out: read once below
        _launch(
            "_split_fwd_kernel",
            (P, Q),
            dict(num_warps=cfg.ew_warps),
            u_ptr=u_lin,
            z_ptr=z,
            mean_ptr=mean,
            inv_var_ptr=inv_var,
            pmean_ptr=pmean,
            pm2_ptr=pm2,
            psel_ptr=psel,
            ploss_ptr=ploss,
            M=T,
            N=N,
            tau=float(tau),
            eps=float(eps),
            APPROX_TANH=approx_tanh,
            BF16_RNE=_bf16_rne(x.dtype, interp),
            FAST_LOG=cfg.fast_log and not interp,
            EVEN_M=T % bm == 0,
            EVEN_N=N % bn == 0,
            BLOCK_M=bm,
            BLOCK_N=bn,
        )
        if not cfg.save_preact:
            u_lin = None
    else:
        u_lin = torch.empty((T, N), dtype=x.dtype, device=dev) if cfg.save_preact else None
        _gemm_launch(
            x,
            weight,
            bias,
            u_lin,
            z,
            mean,
            inv_var,
            (pmean, pm2, psel, ploss),
            tau,
            eps,
            approx_tanh,
            save_u=cfg.save_preact,
            epilogue=True,
            cfg=cfg,
        )
    bmean = torch.empty((N,), dtype=torch.float32, device=dev)
    bm2 = torch.empty((N,), dtype=torch.float32, device=dev)
    loss_sum = torch.empty((), dtype=torch.float32, device=dev)
    n_sel = torch.empty((), dtype=torch.int64, device=dev)
    count = torch.empty((), dtype=torch.float32, device=dev)
    # one launch merges the moments and reduces the loss / count partials (fixed order: deterministic)
    merge_bn = _merge_block_n(cfg, N)
    _launch(
        "_merge_moments_kernel",
        (_cdiv(N, merge_bn),),
        dict(num_warps=4),
        pmean_ptr=pmean,
        pm2_ptr=pm2,
        mean_out_ptr=bmean,
        m2_out_ptr=bm2,
        psel_ptr=psel,
        ploss_ptr=ploss,
        n_sel_out_ptr=n_sel,
        loss_out_ptr=loss_sum,
        count_out_ptr=count,
        M=T,
        N=N,
        P=P,
        R=P * Q,
        BLOCK_M=bm,
        BLOCK_P=cfg.merge_block_p,
        BLOCK_N=merge_bn,
        BLOCK_R=cfg.merge_block_r,
    )
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
    _gemm_launch(
        x,
        weight,
        bias,
        u_lin,
        None,
        torch.empty(1, dtype=torch.float32, device=x.device),
        torch.empty(1, dtype=torch.float32, device=x.device),
        None,
        1.0,
        0.0,
        False,
        save_u=True,
        epilogue=False,
        cfg=cfg,
    )
    return u_lin


def _backward_du(
    u_lin, need_db, dz, g, mean, inv_var, tau, eps, approx_tanh, cfg: KernelConfig, need_du_lm: bool = False
):
    """dL/du [T, N] in u_lin.dtype (u_lin: the pre-activation, bias included); when need_db, db (fp32 [N]);
    when need_du_lm, also the LM part alone, dL/dz * GELU'(u) (bitwise the dL/du of a call without ``g``)."""
    T, N = u_lin.shape
    interp = interpreter_enabled()
    bm, bn = _ew_tile(cfg, N, interp)
    P, Q = _cdiv(T, bm), _cdiv(N, bn)
    du = torch.empty_like(u_lin)
    du_lm = torch.empty_like(u_lin) if need_du_lm else None
    pdb = torch.empty((P, N), dtype=torch.float32, device=u_lin.device) if need_db else mean
    _launch(
        "_bwd_kernel",
        (P, Q),
        dict(num_warps=cfg.ew_warps),
        u_ptr=u_lin,
        dz_ptr=dz if dz is not None else u_lin,
        g_ptr=g if g is not None else mean,
        mean_ptr=mean,
        inv_var_ptr=inv_var,
        du_ptr=du,
        du_lm_ptr=du_lm if need_du_lm else du,
        pdb_ptr=pdb,
        M=T,
        N=N,
        stride_dzm=dz.stride(0) if dz is not None else 0,
        stride_dzn=dz.stride(1) if dz is not None else 0,
        tau=float(tau),
        eps=float(eps),
        NEED_DB=need_db,
        HAS_DZ=dz is not None,
        HAS_G=g is not None,
        STORE_DU_LM=need_du_lm,
        APPROX_TANH=approx_tanh,
        BF16_RNE=_bf16_rne(u_lin.dtype, interp),
        EVEN_M=T % bm == 0,
        EVEN_N=N % bn == 0,
        BLOCK_M=bm,
        BLOCK_N=bn,
    )
    db = pdb.sum(dim=0) if need_db else None
    return du, du_lm, db


def _device_guard(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


class FusedUpGeluL2E(torch.autograd.Function):
    """z = GELU(x W^T + b) with the L2E loss, selection count and batch moments; gradients for x, W, b.
    With ``grad_to_input=False`` the loss's gradient reaches W and b but not x (dx is the LM part alone)."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, inv_var, tau, eps, approximate, mode, cfg, grad_to_input=True):
        approx_tanh = approximate == "tanh"
        with _device_guard(x):
            z, loss_sum, n_sel, count, bmean, bm2, u_lin = _forward(
                x, weight, bias, mean, inv_var, tau, eps, approx_tanh, mode, cfg
            )
        ctx.save_for_backward(x, weight, bias, mean, inv_var, u_lin)
        ctx.tau, ctx.eps, ctx.approx_tanh, ctx.mode, ctx.cfg = tau, eps, approx_tanh, mode, cfg
        ctx.grad_to_input = bool(grad_to_input)
        ctx.mark_non_differentiable(n_sel, count, bmean, bm2)
        ctx.set_materialize_grads(False)
        return z, loss_sum, n_sel, count, bmean, bm2

    @staticmethod
    @once_differentiable
    def backward(ctx, dz, dloss, *_unused):
        x, weight, bias, mean, inv_var, u_lin = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        none = (None,) * 8
        if (dz is None and dloss is None) or not (need_x or need_w or need_b):
            return (None, None, None) + none
        g = dloss.detach().to(torch.float32).reshape(()) if dloss is not None else None
        need_wb = need_w or need_b
        # l2e_grad_to_input=False: dx from the LM gradient alone, a second output of the same backward pass
        lm_only_dx = need_x and g is not None and not ctx.grad_to_input
        if lm_only_dx and not need_wb:
            g, lm_only_dx = None, False  # only dx is wanted, and it must not see the loss
        if g is None and dz is None:
            return (None, None, None) + none
        with _device_guard(x):
            if u_lin is None:
                u_lin = _recompute_preact(x, weight, bias, ctx.mode, ctx.cfg)
            du, du_lm, db = _backward_du(
                u_lin,
                need_b and bias is not None,
                dz,
                g,
                mean,
                inv_var,
                ctx.tau,
                ctx.eps,
                ctx.approx_tanh,
                ctx.cfg,
                need_du_lm=lm_only_dx and dz is not None,
            )
        if not need_x:
            dx = None
        elif lm_only_dx:
            dx = du_lm @ weight if du_lm is not None else None  # no dL/dz: x gets no gradient from this op
        else:
            dx = du @ weight  # cuBLAS through torch
        dw = du.t() @ x if need_w else None
        db = db.to(bias.dtype) if need_b else None
        return (dx, dw, db) + none


def _apply_kernels(
    x, weight, bias, mean, inv_var, tau, eps, approximate, mode, cfg: KernelConfig, l2e_grad_to_input: bool = True
):
    """The Triton path of ``fused_up_gelu_l2e`` after argument checks and dispatch (also what the
    ahead-of-time check drives, on ``meta`` tensors, to list the launches)."""
    mean = mean.detach().contiguous()
    inv_var = inv_var.detach().contiguous()
    if bias is not None:
        bias = bias.contiguous()
    z, loss_sum, n_sel, count, bmean, bm2 = FusedUpGeluL2E.apply(
        x, weight, bias, mean, inv_var, float(tau), float(eps), approximate, mode, cfg, bool(l2e_grad_to_input)
    )
    return z, loss_sum, n_sel, (count, bmean, bm2)


def _reference_split_grad(x, weight, bias, mean, inv_var, tau, eps, approximate, mode, l2e_grad_to_input):
    """The torch implementation; with ``l2e_grad_to_input=False`` the loss comes from a second evaluation on
    ``x.detach()`` (its gradient reaches W and b, not x) and z from the first (twice the work: fallback only)."""
    out = l2e_mlp_reference(x, weight, bias, mean, inv_var, tau, eps, approximate, mode, round_preact=True)
    if l2e_grad_to_input or not x.requires_grad:
        return out
    loss_sum = l2e_mlp_reference(
        x.detach(), weight, bias, mean, inv_var, tau, eps, approximate, mode, round_preact=True
    )[1]
    return out[0], loss_sum, out[2], out[3]


def _autocast_inputs(x, weight, bias):
    """Under autocast, cast x, weight and bias to the autocast dtype, as F.linear does there (so fp32 master
    weights work with a bf16/fp16 autocast region); otherwise unchanged."""
    dev_type = x.device.type
    if dev_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(dev_type):
        return x, weight, bias
    dt = torch.get_autocast_dtype(dev_type)

    def cast(t):
        return t.to(dt) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t

    return cast(x), cast(weight), cast(bias)


@torch.compiler.disable  # runs eagerly inside a compiled model (a graph break), never traced by dynamo
def fused_up_gelu_l2e(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    mean: torch.Tensor,
    inv_var: torch.Tensor,
    tau: float,
    eps: float,
    approximate: str = "none",
    mode: str = "split",
    *,
    config: Optional[KernelConfig] = None,
    save_preact: Optional[bool] = None,
    l2e_grad_to_input: bool = True,
):
    """Fused MLP up-projection + GELU + L2E on one tensor-parallel shard of neurons.

    Returns ``z, loss_sum, n_sel, (count, bmean, bm2)``; see the package docstring. ``config`` overrides
    the launch configuration (tests use small tiles); ``save_preact`` overrides ``config.save_preact``
    (True: keep the pre-activation x W^T for backward; False: recompute it there with the forward's GEMM).
    ``l2e_grad_to_input=False``: the gradient of ``loss_sum`` reaches ``weight`` and ``bias`` but not ``x``;
    dx is then bitwise the dx of the LM gradient alone (dL/dz only).
    Under autocast (CUDA or CPU), x, weight and bias are cast to the autocast dtype as ``F.linear`` casts them.
    Inside ``torch.compile`` the call is a graph break (the kernels run eagerly; dynamo does not trace them).
    Tensors the kernels cannot run on (CPU without TRITON_INTERPRET=1) go through the torch
    implementation of the same contract (``l2e_mlp_reference(..., round_preact=True)``).
    The backward is once-differentiable (no double backward).
    """
    x, weight, bias = _autocast_inputs(x, weight, bias)
    _check_args(x, weight, bias, mean, inv_var, tau, eps, approximate, mode)
    dev_type = x.device.type
    autocast_on = dev_type in ("cuda", "cpu") and torch.is_autocast_enabled(dev_type)
    # autocast off inside (entering the context costs microseconds of host time: only when it is on)
    with torch.autocast(dev_type, enabled=False) if autocast_on else contextlib.nullcontext():
        if not triton_usable(x.device) and _RECORDING is None:
            return _reference_split_grad(x, weight, bias, mean, inv_var, tau, eps, approximate, mode, l2e_grad_to_input)
        cfg = config if config is not None else default_config()
        if save_preact is not None and save_preact != cfg.save_preact:
            cfg = replace(cfg, save_preact=bool(save_preact))
        return _apply_kernels(x, weight, bias, mean, inv_var, tau, eps, approximate, mode, cfg, l2e_grad_to_input)
