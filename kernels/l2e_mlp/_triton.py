"""Triton kernels of the fused MLP up-projection + GELU + L2E (forward epilogue, statistics merge, backward).

All arithmetic after the GEMM is fp32. Tiles are [BLOCK_M rows (tokens), BLOCK_N columns (neurons)].
Per-tile outputs go to partials buffers that the host (or ``_merge_moments_kernel``) reduces in a fixed
order; no float atomics anywhere, so every output is bitwise reproducible for a given launch config.

Partials layout (P = cdiv(T, BLOCK_M) row blocks, Q = cdiv(N, BLOCK_N) column blocks):
    pmean[P, N], pm2[P, N]  fp32   per-row-block column mean and M2, two passes inside the tile of c rows (errors
                                   <= (c + 1) u max|z| and (c + 3) u M2 to first order, u = 2^-24; the merged
                                   bound: docs/kernels.md, "Tiles, partials and merge order")
    psel[P, Q]              int32  selected entries of the tile
    ploss[P, Q]             fp32   sum over the tile's selected entries of log((z - mean)^2 + eps)
Row block p has min(BLOCK_M, T - p * BLOCK_M) rows; that count is implied, never stored.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

# constants written inline below: 0.7071067811865476 = 1/sqrt(2), 0.3989422804014327 = 1/sqrt(2 pi),
# 0.7978845608028654 = sqrt(2/pi), 0.044715 (the tanh GELU's cubic coefficient)


@triton.jit
def _gelu(u, APPROX_TANH: tl.constexpr):
    """GELU of fp32 ``u``. tanh form written as u * sigmoid(2a) (= 0.5 u (1 + tanh a)), which has no
    cancellation near 0 and saturates cleanly for large |a|."""
    if APPROX_TANH:
        a = 0.7978845608028654 * (u + 0.044715 * u * u * u)
        z = u / (1.0 + tl.exp(-2.0 * a))
    else:
        z = 0.5 * u * (1.0 + tl.math.erf(u * 0.7071067811865476))
    return z


@triton.jit
def _gelu_and_grad(u, APPROX_TANH: tl.constexpr):
    """(GELU(u), dGELU/du) of fp32 ``u``, sharing the erf / sigmoid; GELU(u) is bitwise ``_gelu(u)``."""
    if APPROX_TANH:
        a = 0.7978845608028654 * (u + 0.044715 * u * u * u)
        e = 1.0 + tl.exp(-2.0 * a)
        z = u / e
        s = 1.0 / e  # = 0.5 (1 + tanh a);  1 - tanh^2 a = 4 s (1 - s)
        g = s + u * (2.0 * s * (1.0 - s)) * (0.7978845608028654 * (1.0 + 3.0 * 0.044715 * u * u))
    else:
        cdf1 = 1.0 + tl.math.erf(u * 0.7071067811865476)  # 2 * Phi(u)
        z = 0.5 * u * cdf1
        pdf = tl.exp(-0.5 * u * u) * 0.3989422804014327
        g = 0.5 * cdf1 + u * pdf
    return z, g


@triton.jit
def _log(x, FAST_LOG: tl.constexpr):
    """Natural log. FAST_LOG (compiled CUDA only): lg2.approx * ln 2 (libdevice's fast_logf; max error a few
    fp32 ulps on the normal range, inputs here are >= eps or selected squared deviations) instead of the
    ~20-instruction accurate logf, which is a large share of the epilogue's issue slots."""
    if FAST_LOG:
        y = libdevice.fast_logf(x)
    else:
        y = tl.log(x)
    return y


@triton.jit
def _round_bf16(x, BF16_RNE: tl.constexpr):
    """fp32 -> bf16-representable fp32 with round-to-nearest-even, done by hand when BF16_RNE: Triton's
    interpreter truncates fp32 -> bf16 casts (compiled code rounds to nearest even already; inf/finite
    values only, which is all this path sees)."""
    if BF16_RNE:
        b = x.to(tl.uint32, bitcast=True)
        b = (b + (0x7FFF + ((b >> 16) & 1))) & 0xFFFF0000
        x = b.to(tl.float32, bitcast=True)
    return x


@triton.jit
def _bounds_mask(idx, bound, SIZE: tl.constexpr, EVEN: tl.constexpr):
    """idx < bound, or a constant all-true mask when the launch guarantees it (the compiler then drops
    the predicates and the selects that use it)."""
    if EVEN:
        m = tl.full((SIZE,), 1, tl.int1)
    else:
        m = idx < bound
    return m


@triton.jit
def _l2e_epilogue(
    u,
    rows,
    cols,
    row_mask,
    col_mask,
    pid_m,
    pid_n,
    M,
    N,
    num_pid_n,
    z_ptr,
    mean_ptr,
    inv_var_ptr,
    tau,
    eps,
    pmean_ptr,
    pm2_ptr,
    psel_ptr,
    ploss_ptr,
    APPROX_TANH: tl.constexpr,
    BF16_RNE: tl.constexpr,
    FAST_LOG: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """From the fp32 pre-activation tile ``u`` (bias included): store z, then the tile's L2E partials."""
    mask2 = row_mask[:, None] & col_mask[None, :]
    z = _gelu(u, APPROX_TANH)
    z_offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    tl.store(z_ptr + z_offs, _round_bf16(z, BF16_RNE).to(z_ptr.dtype.element_ty), mask=mask2)

    mu = tl.load(mean_ptr + cols, mask=col_mask, other=0.0)
    iv = tl.load(inv_var_ptr + cols, mask=col_mask, other=0.0)
    d = z - mu[None, :]
    d2 = d * d
    phi = d2 * iv[None, :]
    sel = (phi >= tau) & mask2
    n_sel = tl.sum(tl.sum(sel.to(tl.int32), axis=1), axis=0)
    terms = tl.where(sel, _log(d2 + eps, FAST_LOG), 0.0)
    loss = tl.sum(tl.sum(terms, axis=1), axis=0)
    tl.store(psel_ptr + pid_m * num_pid_n + pid_n, n_sel)
    tl.store(ploss_ptr + pid_m * num_pid_n + pid_n, loss)

    # two-pass moments of the tile's valid rows, from the registers (z is read once). Kept over a single pass
    # shifted by the running mean (column sums of d and d2, M2 = s2 - s1^2 / c): compiled for sm_90 that saves no
    # instructions (the column reductions' shuffles and cross-warp stage cost the same, not the arithmetic) and its
    # relative error grows like u c (tile mean - mu)^2 / M2, all digits lost at mu = 0 (the first batch) on a
    # column with mean / std ~ 1e3. Error bound of this form: tests/kernels (moments_bound); docs/kernels.md.
    cnt = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
    t_mean = tl.sum(tl.where(mask2, z, 0.0), axis=0) / cnt
    dev = tl.where(mask2, z - t_mean[None, :], 0.0)
    t_m2 = tl.sum(dev * dev, axis=0)
    p_offs = pid_m.to(tl.int64) * N + cols
    tl.store(pmean_ptr + p_offs, t_mean, mask=col_mask)
    tl.store(pm2_ptr + p_offs, t_m2, mask=col_mask)


@triton.jit
def _split_fwd_kernel(
    u_ptr,
    z_ptr,
    mean_ptr,
    inv_var_ptr,
    pmean_ptr,
    pm2_ptr,
    psel_ptr,
    ploss_ptr,
    M,
    N,
    tau,
    eps,
    APPROX_TANH: tl.constexpr,
    BF16_RNE: tl.constexpr,
    FAST_LOG: tl.constexpr,
    EVEN_M: tl.constexpr,
    EVEN_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """ "split" mode: u = x W^T + b (cuBLAS addmm, [M, N] contiguous, x.dtype: F.linear's bits) is read
    once; GELU, z and the L2E partials in one pass."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    num_pid_n = tl.num_programs(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = _bounds_mask(rows, M, BLOCK_M, EVEN_M)
    col_mask = _bounds_mask(cols, N, BLOCK_N, EVEN_N)
    mask2 = row_mask[:, None] & col_mask[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    u = tl.load(u_ptr + offs, mask=mask2, other=0.0).to(tl.float32)
    _l2e_epilogue(
        u,
        rows,
        cols,
        row_mask,
        col_mask,
        pid_m,
        pid_n,
        M,
        N,
        num_pid_n,
        z_ptr,
        mean_ptr,
        inv_var_ptr,
        tau,
        eps,
        pmean_ptr,
        pm2_ptr,
        psel_ptr,
        ploss_ptr,
        APPROX_TANH,
        BF16_RNE,
        FAST_LOG,
        BLOCK_M,
    )


@triton.jit
def _gemm_fwd_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    u_ptr,
    z_ptr,
    mean_ptr,
    inv_var_ptr,
    pmean_ptr,
    pm2_ptr,
    psel_ptr,
    ploss_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    tau,
    eps,
    HAS_BIAS: tl.constexpr,
    SAVE_U: tl.constexpr,
    EPILOGUE: tl.constexpr,
    APPROX_TANH: tl.constexpr,
    BF16_RNE: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    FAST_LOG: tl.constexpr,
    EVEN_M: tl.constexpr,
    EVEN_N: tl.constexpr,
    EVEN_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """ "fused-gemm" mode: u = x W^T + b with fp32 accumulation, the bias added to the accumulator and
    the sum rounded once to x.dtype (the pre-activation of "split" and of F.linear), optionally stored
    (SAVE_U), then the L2E epilogue (EPILOGUE=False only recomputes u)."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # grouped launch order: GROUP_M row blocks share the W column panel while it is in L2
    group_size = GROUP_M * num_pid_n
    group_id = pid // group_size
    first_m = group_id * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % group_m
    pid_n = (pid % group_size) // group_m

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = _bounds_mask(rows, M, BLOCK_M, EVEN_M)
    col_mask = _bounds_mask(cols, N, BLOCK_N, EVEN_N)
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_xm + ks[None, :] * stride_xk
    w_ptrs = w_ptr + cols.to(tl.int64)[None, :] * stride_wn + ks[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_mask = _bounds_mask(ks, K - kb * BLOCK_K, BLOCK_K, EVEN_K)
        a = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if DOT_FP32:  # the interpreter's bf16 dot is wrong: do it in fp32 there (products are exact)
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        bv = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        acc = acc + bv[None, :]
    u_lin = _round_bf16(acc, BF16_RNE).to(x_ptr.dtype.element_ty)  # the stored/saved pre-activation, as addmm gives it
    if SAVE_U:
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        tl.store(u_ptr + offs, u_lin, mask=row_mask[:, None] & col_mask[None, :])
    if EPILOGUE:
        u = u_lin.to(tl.float32)
        _l2e_epilogue(
            u,
            rows,
            cols,
            row_mask,
            col_mask,
            pid_m,
            pid_n,
            M,
            N,
            num_pid_n,
            z_ptr,
            mean_ptr,
            inv_var_ptr,
            tau,
            eps,
            pmean_ptr,
            pm2_ptr,
            psel_ptr,
            ploss_ptr,
            APPROX_TANH,
            BF16_RNE,
            FAST_LOG,
            BLOCK_M,
        )


@triton.jit
def _merge_moments_kernel(
    pmean_ptr,
    pm2_ptr,
    mean_out_ptr,
    m2_out_ptr,
    psel_ptr,
    ploss_ptr,
    n_sel_out_ptr,
    loss_out_ptr,
    count_out_ptr,
    M,
    N,
    P,
    R,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Merge the P row-block partials of each column: the multi-way form of Chan's merge,
        mean = sum_p c_p mean_p / n,    M2 = sum_p M2_p + sum_p c_p (mean_p - mean)^2,
    which equals the left fold of pairwise merges in exact arithmetic, uses only non-negative terms
    (no sum-of-squares cancellation) and reduces in a fixed order (chunks of BLOCK_P, in order).
    Program 0 also reduces the R = P * Q tile partials of the selection count (int64) and the loss (fp64
    accumulation, fp32 result) in a fixed order (chunks of BLOCK_R, in order), and stores the row count M:
    no separate launches for those scalars."""
    pid = tl.program_id(0)
    if pid == 0:
        rs = tl.arange(0, BLOCK_R)
        sel_acc = tl.zeros((BLOCK_R,), dtype=tl.int64)
        loss_acc = tl.zeros((BLOCK_R,), dtype=tl.float64)
        for r0 in range(0, R, BLOCK_R):
            r = r0 + rs
            rm = r < R
            sel_acc += tl.load(psel_ptr + r, mask=rm, other=0).to(tl.int64)
            loss_acc += tl.load(ploss_ptr + r, mask=rm, other=0.0).to(tl.float64)
        tl.store(n_sel_out_ptr, tl.sum(sel_acc, axis=0))
        tl.store(loss_out_ptr, tl.sum(loss_acc, axis=0).to(tl.float32))
        tl.store(count_out_ptr, M * 1.0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    ps = tl.arange(0, BLOCK_P)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + ps
        pm = p < P
        c = tl.where(pm, tl.minimum(M - p * BLOCK_M, BLOCK_M), 0).to(tl.float32)
        offs = p.to(tl.int64)[:, None] * N + cols[None, :]
        mp = tl.load(pmean_ptr + offs, mask=pm[:, None] & col_mask[None, :], other=0.0)
        acc += tl.sum(c[:, None] * mp, axis=0)
    mean = acc / (M * 1.0)
    m2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + ps
        pm = p < P
        c = tl.where(pm, tl.minimum(M - p * BLOCK_M, BLOCK_M), 0).to(tl.float32)
        offs = p.to(tl.int64)[:, None] * N + cols[None, :]
        lm = pm[:, None] & col_mask[None, :]
        mp = tl.load(pmean_ptr + offs, mask=lm, other=0.0)
        m2p = tl.load(pm2_ptr + offs, mask=lm, other=0.0)
        dm = mp - mean[None, :]
        m2 += tl.sum(m2p + c[:, None] * dm * dm, axis=0)
    tl.store(mean_out_ptr + cols, mean, mask=col_mask)
    tl.store(m2_out_ptr + cols, m2, mask=col_mask)


@triton.jit
def _bwd_kernel(
    u_ptr,
    dz_ptr,
    g_ptr,
    mean_ptr,
    inv_var_ptr,
    du_ptr,
    du_lm_ptr,
    pdb_ptr,
    M,
    N,
    stride_dzm,
    stride_dzn,
    tau,
    eps,
    NEED_DB: tl.constexpr,
    HAS_DZ: tl.constexpr,
    HAS_G: tl.constexpr,
    STORE_DU_LM: tl.constexpr,
    APPROX_TANH: tl.constexpr,
    BF16_RNE: tl.constexpr,
    EVEN_M: tl.constexpr,
    EVEN_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dL/du = (dL/dz + g * selected * 2 (z - mean) / ((z - mean)^2 + eps)) * GELU'(u), with z and the
    selection recomputed from the saved pre-activation (bitwise the forward's), plus per-row-block
    column sums of dL/du (fp32) for the bias gradient when NEED_DB. u is the saved pre-activation, bias
    included. STORE_DU_LM: also store the LM part dL/dz * GELU'(u) alone (by the very expression a launch
    with HAS_G=False stores as dL/du, so bitwise equal to it)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = _bounds_mask(rows, M, BLOCK_M, EVEN_M)
    col_mask = _bounds_mask(cols, N, BLOCK_N, EVEN_N)
    mask2 = row_mask[:, None] & col_mask[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    u = tl.load(u_ptr + offs, mask=mask2, other=0.0).to(tl.float32)
    grad = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_DZ:
        dz_offs = rows.to(tl.int64)[:, None] * stride_dzm + cols[None, :] * stride_dzn
        grad += tl.load(dz_ptr + dz_offs, mask=mask2, other=0.0).to(tl.float32)
    z, gelu_grad = _gelu_and_grad(u, APPROX_TANH)
    if STORE_DU_LM:
        du_lm = tl.where(mask2, grad * gelu_grad, 0.0)
        tl.store(du_lm_ptr + offs, _round_bf16(du_lm, BF16_RNE).to(du_lm_ptr.dtype.element_ty), mask=mask2)
    if HAS_G:
        g = tl.load(g_ptr).to(tl.float32)
        mu = tl.load(mean_ptr + cols, mask=col_mask, other=0.0)
        iv = tl.load(inv_var_ptr + cols, mask=col_mask, other=0.0)
        d = z - mu[None, :]
        d2 = d * d
        sel = ((d2 * iv[None, :]) >= tau) & mask2
        grad += tl.where(sel, g * (2.0 * d / (d2 + eps)), 0.0)
    du = tl.where(mask2, grad * gelu_grad, 0.0)
    tl.store(du_ptr + offs, _round_bf16(du, BF16_RNE).to(du_ptr.dtype.element_ty), mask=mask2)
    if NEED_DB:
        tl.store(pdb_ptr + pid_m.to(tl.int64) * N + cols, tl.sum(du, axis=0), mask=col_mask)
