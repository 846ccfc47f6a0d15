"""Correctness of the fused up-projection + GELU + L2E kernel (neox_l2e.kernels.l2e_mlp).

Every check is against an fp64 oracle of the kernel's contract (written out here, not taken from the
kernel package): u = round_to_dtype(x W^T + b), z = GELU(u), phi, selection, loss, moments and the
gradients, all in fp64. On CPU the kernels run in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1); the same tests run compiled on CUDA (marked gpu, skipped without one).

Tolerances, as a kernel library sets them: z elementwise (rtol, atol) per dtype; reductions (loss,
moments) and gradients relative to the largest magnitude of the expected tensor.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from neox_l2e.kernels.l2e_mlp import KernelConfig, fused_up_gelu_l2e, interpreter_enabled, l2e_mlp_reference
from neox_l2e.l2e import functional as L

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not interpreter_enabled(), reason="CPU needs TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=pytest.mark.gpu),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MODES = ["split", "fused-gemm"]
APPROX = ["none", "tanh"]

# z: elementwise (rtol, atol); RED: relative to max |expected| for reductions and gradients
Z_TOL = {torch.float32: (1e-5, 1e-6), torch.float16: (2e-3, 1e-3), torch.bfloat16: (1.6e-2, 1e-2)}
RED_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# small tiles so that odd shapes span several tiles in every dimension (and the interpreter stays quick)
SMALL = KernelConfig(
    ew_block_m=16,
    ew_block_n=32,
    mm_block_m=16,
    mm_block_n=32,
    mm_block_k=32,
    mm_group_m=2,
    mm_warps=4,
    mm_stages=2,
    ew_warps=4,
    merge_block_p=2,
    merge_block_n=32,
    merge_block_r=4,
)

T, H, N = 37, 45, 70  # none a multiple of any block


def _close(actual, expected, rel, what):
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    scale = e.abs().max().item() if e.numel() else 0.0
    err = (a - e).abs().max().item() if e.numel() else 0.0
    assert err <= rel * max(scale, 1e-6), f"{what}: max abs err {err:.3e} > {rel:g} * {scale:.3e}"


def _inputs(device, dtype, t=T, h=H, n=N, bias=True, seed=0, ineligible_every=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g).to(dtype)
    w = (torch.randn(n, h, generator=g) / math.sqrt(h)).to(dtype)
    b = (0.2 * torch.randn(n, generator=g)).to(dtype) if bias else None
    mean = 0.1 * torch.randn(n, generator=g)
    inv_var = 0.5 + 2.0 * torch.rand(n, generator=g)
    if ineligible_every:
        inv_var[::ineligible_every] = 0.0  # ineligible neurons: phi = 0, never selected
    dz = torch.randn(t, n, generator=g).to(dtype)
    out = [x, w, b, mean, inv_var, dz]
    return [v.to(device) if v is not None else None for v in out]


def _gelu64(u, approximate):
    return F.gelu(u, approximate=approximate)


def oracle(x, w, b, mean, inv_var, tau, eps, approximate, dz=None, lam=0.0):
    """fp64 contract: returns dict of z, loss, n_sel, bmean, bm2, phi, mask and (if dz) dx, dw, db."""
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if b is not None else None
    u = x64 @ w64.t() + b64 if b64 is not None else x64 @ w64.t()
    if x.dtype != torch.float32:  # the contract's rounding of x W^T + b to x.dtype (straight-through in backward)
        u = u + (u.detach().to(x.dtype).double() - u.detach())
    z = _gelu64(u, approximate)
    d = z - mean.double()
    phi = d * d * inv_var.double()
    mask = (phi >= tau).detach()
    terms = torch.log(torch.where(mask, d * d + eps, torch.ones_like(d)))  # log 1 = 0 off the selection
    loss = terms.sum()
    zd = z.detach()
    bmean = zd.mean(0)
    bm2 = ((zd - bmean) ** 2).sum(0)
    out = dict(
        z=zd,
        loss=loss.detach(),
        abs_loss=terms.detach().abs().sum(),
        n_sel=int(mask.sum()),
        bmean=bmean,
        bm2=bm2,
        phi=phi.detach(),
        mask=mask,
    )
    if dz is not None:
        total = (z * dz.double()).sum() + lam * loss
        leaves = [x64, w64] + ([b64] if b64 is not None else [])
        grads = torch.autograd.grad(total, leaves)
        out.update(dx=grads[0], dw=grads[1], db=grads[2] if b64 is not None else None)
    return out


def pick_tau(phi, inv_var, lo=0.5, hi=0.9):
    """A threshold in the widest relative gap of the eligible phi values between two quantiles, so that
    rounding differences far below the gap cannot move any entry across it."""
    vals = phi[:, inv_var.cpu() > 0].flatten().sort().values
    i0, i1 = int(lo * vals.numel()), int(hi * vals.numel())
    seg = vals[i0 : i1 + 1]
    rel = (seg[1:] - seg[:-1]) / seg[1:]
    k = int(rel.argmax())
    return float(math.sqrt(seg[k] * seg[k + 1])), float(rel[k])


def _run(x, w, b, mean, inv_var, tau, eps, approximate, mode, dz, lam, cfg=SMALL):
    xr = x.clone().requires_grad_()
    wr = w.clone().requires_grad_()
    br = b.clone().requires_grad_() if b is not None else None
    z, loss, n_sel, (count, bmean, bm2) = fused_up_gelu_l2e(
        xr, wr, br, mean, inv_var, tau, eps, approximate, mode, config=cfg
    )
    total = (z.float() * dz.float()).sum() + lam * loss
    total.backward()
    return dict(
        z=z,
        loss=loss.detach(),
        n_sel=n_sel,
        count=count,
        bmean=bmean,
        bm2=bm2,
        dx=xr.grad,
        dw=wr.grad,
        db=br.grad if br is not None else None,
    )


def _check_against_oracle(got, ref, dtype, x, check_grads=True):
    rtol, atol = Z_TOL[dtype]
    assert got["z"].dtype == dtype and got["z"].shape == ref["z"].shape
    torch.testing.assert_close(got["z"].double().cpu(), ref["z"].to(dtype).double().cpu(), rtol=rtol, atol=atol)
    red = RED_TOL[dtype]
    assert got["n_sel"].dtype == torch.int64 and got["n_sel"].dim() == 0
    assert int(got["n_sel"]) == ref["n_sel"]
    assert got["loss"].dtype == torch.float32 and got["loss"].dim() == 0
    assert abs(float(got["loss"].detach()) - float(ref["loss"])) <= red * max(float(ref["abs_loss"]), 1e-6) + 1e-6
    assert got["count"].dtype == torch.float32 and float(got["count"]) == x.shape[0]
    assert got["bmean"].dtype == torch.float32 and got["bm2"].dtype == torch.float32
    _close(got["bmean"], ref["bmean"], red, "bmean")
    _close(got["bm2"], ref["bm2"], red, "bm2")
    if check_grads:
        _close(got["dx"], ref["dx"], red, "dx")
        _close(got["dw"], ref["dw"], red, "dw")
        if ref["db"] is not None:
            _close(got["db"], ref["db"], red, "db")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_fp64_oracle(device, dtype, mode, approximate):
    x, w, b, mean, inv_var, dz = _inputs(device, dtype)
    eps, lam = 1e-6, 0.37
    pre = oracle(x, w, b, mean, inv_var, math.inf, eps, approximate)
    tau, gap = pick_tau(pre["phi"].cpu(), inv_var)
    assert gap > 1e-3  # the test's own premise
    ref = oracle(x, w, b, mean, inv_var, tau, eps, approximate, dz=dz, lam=lam)
    assert 0 < ref["n_sel"] < x.shape[0] * N
    got = _run(x, w, b, mean, inv_var, tau, eps, approximate, mode, dz, lam)
    _check_against_oracle(got, ref, dtype, x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("mode", MODES)
def test_shapes_that_divide_the_tiles(device, mode, approximate):
    """T, N and h multiples of the tiles: the kernels' unmasked (EVEN_*) specialisation, the Pythia case."""
    dtype = torch.bfloat16
    x, w, b, mean, inv_var, dz = _inputs(device, dtype, t=32, h=64, n=64, seed=12)
    pre = oracle(x, w, b, mean, inv_var, math.inf, 1e-6, approximate)
    tau, _ = pick_tau(pre["phi"].cpu(), inv_var)
    ref = oracle(x, w, b, mean, inv_var, tau, 1e-6, approximate, dz=dz, lam=0.4)
    got = _run(x, w, b, mean, inv_var, tau, 1e-6, approximate, mode, dz, lam=0.4)
    _check_against_oracle(got, ref, dtype, x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_tau_inf_selects_nothing(device, mode):
    dtype = torch.float32
    x, w, b, mean, inv_var, dz = _inputs(device, dtype, seed=1)
    got = _run(x, w, b, mean, inv_var, math.inf, 1e-6, "none", mode, dz, lam=5.0)
    assert int(got["n_sel"]) == 0 and float(got["loss"]) == 0.0
    ref = oracle(x, w, b, mean, inv_var, math.inf, 1e-6, "none", dz=dz, lam=0.0)  # = plain GELU MLP
    _check_against_oracle(got, ref, dtype, x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_tiny_tau_selects_every_eligible_entry(device, mode):
    dtype = torch.float32
    x, w, _, mean, inv_var, dz = _inputs(device, dtype, bias=False, seed=2, ineligible_every=3)
    tau = 1e-30
    ref = oracle(x, w, None, mean, inv_var, tau, 1e-4, "tanh", dz=dz, lam=0.8)
    n_eligible = int((inv_var > 0).sum())
    assert ref["n_sel"] == x.shape[0] * n_eligible
    got = _run(x, w, None, mean, inv_var, tau, 1e-4, "tanh", mode, dz, lam=0.8)
    assert got["db"] is None
    _check_against_oracle(got, ref, dtype, x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_all_ineligible_selects_nothing(device, mode):
    x, w, b, mean, inv_var, dz = _inputs(device, torch.float32, seed=3)
    inv_var = torch.zeros_like(inv_var)
    got = _run(x, w, b, mean, inv_var, 1e-30, 1e-6, "none", mode, dz, lam=1.0)
    assert int(got["n_sel"]) == 0 and float(got["loss"]) == 0.0
    ref = oracle(x, w, b, mean, inv_var, 1e-30, 1e-6, "none", dz=dz, lam=1.0)
    _check_against_oracle(got, ref, torch.float32, x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_loss_only_backward(device, mode):
    """z unused downstream: backward gets no dL/dz (None), only the loss gradient."""
    dtype = torch.float16
    x, w, b, mean, inv_var, dz = _inputs(device, dtype, seed=4)
    tau, _ = pick_tau(oracle(x, w, b, mean, inv_var, math.inf, 1e-6, "none")["phi"].cpu(), inv_var, 0.2, 0.6)
    ref = oracle(x, w, b, mean, inv_var, tau, 1e-6, "none", dz=torch.zeros_like(dz), lam=1.0)
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    z, loss, n_sel, _ = fused_up_gelu_l2e(xr, wr, br, mean, inv_var, tau, 1e-6, "none", mode, config=SMALL)
    loss.backward()
    assert int(n_sel) == ref["n_sel"]
    red = RED_TOL[dtype]
    _close(xr.grad, ref["dx"], red, "dx")
    _close(wr.grad, ref["dw"], red, "dw")
    _close(br.grad, ref["db"], red, "db")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_tensor_parallel_shards_give_slices(device, mode):
    """A slice of W's neurons (a TP shard) gives the matching slice of z, moments and dW; counts, losses and
    dx add up over the shards (what the caller's all-reduce does)."""
    dtype = torch.float32
    x, w, b, mean, inv_var, dz = _inputs(device, dtype, n=2 * N, seed=5)
    tau, _ = pick_tau(oracle(x, w, b, mean, inv_var, math.inf, 1e-6, "none")["phi"].cpu(), inv_var)
    full = _run(x, w, b, mean, inv_var, tau, 1e-6, "none", mode, dz, lam=0.5)
    cut = [0, 61, 2 * N]  # uneven, not at a tile boundary
    shards = [
        _run(x, w[a:c], b[a:c], mean[a:c], inv_var[a:c], tau, 1e-6, "none", mode, dz[:, a:c], lam=0.5)
        for a, c in zip(cut[:-1], cut[1:])
    ]
    red = RED_TOL[dtype]
    _close(torch.cat([s["z"] for s in shards], 1), full["z"], red, "z")
    _close(torch.cat([s["bmean"] for s in shards]), full["bmean"], red, "bmean")
    _close(torch.cat([s["bm2"] for s in shards]), full["bm2"], red, "bm2")
    _close(torch.cat([s["dw"] for s in shards]), full["dw"], red, "dw")
    _close(torch.cat([s["db"] for s in shards]), full["db"], red, "db")
    _close(sum(s["dx"] for s in shards), full["dx"], red, "dx")
    assert sum(int(s["n_sel"]) for s in shards) == int(full["n_sel"])
    assert abs(sum(float(s["loss"]) for s in shards) - float(full["loss"])) <= 1e-4 * abs(float(full["loss"])) + 1e-4
    assert all(float(s["count"]) == x.shape[0] for s in shards)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_deterministic_and_recompute_equals_save(device, mode):
    """Two runs give the same bits; recomputing the pre-activation in backward gives the saved one's bits."""
    dtype = torch.bfloat16
    x, w, b, mean, inv_var, dz = _inputs(device, dtype, seed=6)
    tau, _ = pick_tau(oracle(x, w, b, mean, inv_var, math.inf, 1e-6, "tanh")["phi"].cpu(), inv_var)
    runs = [_run(x, w, b, mean, inv_var, tau, 1e-6, "tanh", mode, dz, lam=0.3) for _ in range(2)]
    recompute = KernelConfig(**{**SMALL.__dict__, "save_preact": False})
    runs.append(_run(x, w, b, mean, inv_var, tau, 1e-6, "tanh", mode, dz, lam=0.3, cfg=recompute))
    for other in runs[1:]:
        for k in ("z", "loss", "n_sel", "bmean", "bm2", "dx", "dw", "db"):
            assert torch.equal(runs[0][k], other[k]), k


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_default_config_and_single_row(device, mode):
    """The default launch configuration (one tile per dimension here) and the T = 1 edge case."""
    for t in (T, 1):
        x, w, b, mean, inv_var, dz = _inputs(device, torch.float32, t=t, seed=7)
        tau = 0.05
        ref = oracle(x, w, b, mean, inv_var, tau, 1e-6, "none", dz=dz, lam=0.5)
        got = _run(x, w, b, mean, inv_var, tau, 1e-6, "none", mode, dz, lam=0.5, cfg=None)
        _check_against_oracle(got, ref, torch.float32, x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_matches_oracle(dtype):
    """l2e_mlp_reference (built from neox_l2e.l2e.functional) against the fp64 oracle, gradients included."""
    x, w, b, mean, inv_var, dz = _inputs("cpu", dtype, seed=8)
    tau, _ = pick_tau(oracle(x, w, b, mean, inv_var, math.inf, 1e-6, "tanh")["phi"], inv_var)
    ref = oracle(x, w, b, mean, inv_var, tau, 1e-6, "tanh", dz=dz, lam=0.7)
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    z, loss, n_sel, (count, bmean, bm2) = l2e_mlp_reference(
        xr, wr, br, mean, inv_var, tau, 1e-6, "tanh", round_preact=True
    )
    ((z.float() * dz.float()).sum() + 0.7 * loss).backward()
    got = dict(z=z, loss=loss, n_sel=n_sel, count=count, bmean=bmean, bm2=bm2, dx=xr.grad, dw=wr.grad, db=br.grad)
    _check_against_oracle(got, ref, dtype, x)
    # the unrounded reference is the "fp32 upcast" one; for fp32 it is the same thing
    z2, loss2, n2, _ = l2e_mlp_reference(x, w, b, mean, inv_var, tau, 1e-6, "tanh")
    if dtype == torch.float32:
        assert torch.equal(z2, z.detach()) and int(n2) == int(n_sel)
    # and it is exactly functional's math on z's fp32 value
    z32 = F.gelu((x.float() @ w.float().t() + b.float()).to(dtype).float(), approximate="tanh")
    mask = L.select(z32, mean, inv_var, tau)
    assert int(mask.sum()) == int(n_sel)
    assert torch.equal(L.inhibition_loss_sum(z32, mean, mask, 1e-6), loss.detach())


def test_cpu_without_interpreter_falls_back_to_torch(monkeypatch):
    x, w, b, mean, inv_var, _ = _inputs("cpu", torch.bfloat16, seed=9)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    z, loss, n_sel, (count, bmean, bm2) = fused_up_gelu_l2e(x, w, b, mean, inv_var, 0.5, 1e-6)
    rz, rloss, rn, (rc, rm, rm2) = l2e_mlp_reference(x, w, b, mean, inv_var, 0.5, 1e-6, round_preact=True)
    assert torch.equal(z, rz) and torch.equal(loss, rloss) and int(n_sel) == int(rn) and torch.equal(bm2, rm2)


@pytest.mark.parametrize(
    "bad",
    [
        dict(mode="triton"),
        dict(approximate="sigmoid"),
        dict(tau=0.0),
        dict(tau=float("nan")),
        dict(mean=torch.zeros(3)),
    ],
)
def test_rejects_bad_arguments(bad):
    x, w, b, mean, inv_var, _ = _inputs("cpu", torch.float32)
    kw = dict(x=x, weight=w, bias=b, mean=mean, inv_var=inv_var, tau=1.0, eps=1e-6)
    kw.update(bad)
    with pytest.raises(ValueError):
        fused_up_gelu_l2e(**kw)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_realistic_shape_default_config(mode, dtype):
    """Compiled kernels at a model-like shape with the GPU launch configuration."""
    x, w, b, mean, inv_var, dz = _inputs("cuda", dtype, t=1000, h=512, n=2048, seed=10)
    tau, _ = pick_tau(oracle(x, w, b, mean, inv_var, math.inf, 1e-6, "none")["phi"].cpu(), inv_var)
    ref = oracle(x, w, b, mean, inv_var, tau, 1e-6, "none", dz=dz, lam=0.2)
    got = _run(x, w, b, mean, inv_var, tau, 1e-6, "none", mode, dz, lam=0.2, cfg=None)
    rtol, atol = Z_TOL[dtype]
    torch.testing.assert_close(got["z"].double(), ref["z"].to(dtype).double(), rtol=rtol, atol=atol)
    # at this size an odd entry may round across tau: allow a few in a million
    assert abs(int(got["n_sel"]) - ref["n_sel"]) <= max(2, ref["n_sel"] // 200000)
    _close(got["bmean"], ref["bmean"], RED_TOL[dtype], "bmean")
    _close(got["dw"], ref["dw"], RED_TOL[dtype], "dw")


def test_inside_torch_compile_is_a_graph_break():
    """A compiled caller (dynamo) runs the kernel eagerly and gets the same values and gradients."""
    x, w, b, mean, inv_var, dz = _inputs("cpu", torch.float32, seed=11)

    def step(x, w, b):
        z, loss, n_sel, (count, bmean, bm2) = fused_up_gelu_l2e(
            x, w, b, mean, inv_var, 0.5, 1e-6, "none", "split", config=SMALL
        )
        return (z * dz).sum() + 0.5 * loss, n_sel, bm2

    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    eager = step(*leaves)
    eager[0].backward()
    ref_grads = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    compiled = torch.compile(step, backend="eager")(*leaves)
    compiled[0].backward()
    assert torch.equal(compiled[0].detach(), eager[0].detach()) and torch.equal(compiled[1], eager[1])
    assert torch.equal(compiled[2], eager[2])
    for t, g in zip(leaves, ref_grads):
        assert torch.equal(t.grad, g)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("approximate", APPROX)
def test_z_is_the_plain_mlp_activation(device, dtype, mode, approximate):
    """L2E does not change the forward: z equals GELU(F.linear(x, W, b)) of the plain MLP in bf16/fp16,
    where the bias is added before the one rounding of the pre-activation. Split mode reads F.linear's own
    pre-activation (addmm), so the only freedom left is the last fp32 bit of GELU before the cast; the
    Triton GEMM of fused-gemm mode may also round its fp32 sum differently, by at most one ulp."""
    x, w, b, mean, inv_var, _ = _inputs(device, dtype, seed=21)
    z = fused_up_gelu_l2e(x, w, b, mean, inv_var, 0.5, 1e-6, approximate, mode, config=SMALL)[0]
    plain = F.gelu(F.linear(x, w, b), approximate=approximate)
    ulp = torch.finfo(dtype).eps * plain.float().abs().clamp_min(torch.finfo(dtype).tiny)
    diff = (z.float() - plain.float()).abs()
    assert bool((diff <= ulp * (1 if mode == "split" else 2) + 1e-30).all()), diff.max()
    assert (diff == 0).float().mean().item() >= (0.995 if mode == "split" else 0.95)


# ---------------------------------------------------------------- batch moments: precision bound (K5)

U32 = 2.0**-24  # fp32 unit roundoff
# (mean, spread) of the pre-activation per column: ordinary GELU columns, then ill-conditioned ones (large mean,
# tiny spread; mean / std up to 1e4) where a shifted single-pass formula with shift 0 would lose every digit
MOMENT_SPECS = [(0.0, 1.0), (-0.5, 0.3), (0.1, 0.05), (3.0, 3e-2), (8.0, 8e-3), (8.0, 8e-4), (20.0, 2e-3), (50.0, 5e-3)]


def _moment_inputs(device, t, h=8, seed=21):
    """fp32 x, W, b giving columns with the (mean, spread) of MOMENT_SPECS, each with three running means:
    0 (the first batch), GELU(b) (near the batch mean) and GELU(b) + 100 spreads."""
    g = torch.Generator().manual_seed(seed)
    cols = [(m, s, k) for (m, s) in MOMENT_SPECS for k in range(3)]
    x = torch.randn(t, h, generator=g)
    w = torch.stack([s * torch.randn(h, generator=g) / math.sqrt(h) for (_, s, _) in cols])
    b = torch.tensor([m for (m, _, _) in cols])
    near = F.gelu(b.double())
    mean = torch.tensor(
        [0.0 if k == 0 else float(near[j]) + (100.0 * s if k == 2 else 0.0) for j, (_, s, k) in enumerate(cols)]
    )
    inv_var = torch.ones(len(cols))
    return [v.to(device) for v in (x, w, b, mean, inv_var)]


def moments_bound(z, block_m):
    """First-order worst-case error bound of the kernel's two-pass batch moments of fp32 ``z`` [T, N], per column.

    Tile of c <= block_m rows (P tiles): mean by one fp32 sum, error <= (c + 1) u max|z|; M2 by a second pass
    over z - tile mean, error <= (c + 3) u M2_tile + O(u^2) (no cancellation). Merge (fp32, fixed order): the
    mean adds <= (P + 1) u max|z|; M2 = sum M2_p + sum c_p (mean_p - mean)^2 adds (P + 3) u M2, and the
    tile means' errors dm_p (<= K u max|z|, K = c + P + 6) enter the second sum as
    2 sum c_p |mean_p - mean| |dm_p| + sum c_p dm_p^2 <= 2 K u max|z| sqrt(T M2) + T (K u max|z|)^2 (Cauchy-Schwarz).
    Returns (bound on |bmean - mean|, bound on |bm2 - M2|, fp64 mean, fp64 M2)."""
    z64 = z.detach().double().cpu()
    t = z64.shape[0]
    mean = z64.mean(0)
    m2 = ((z64 - mean) ** 2).sum(0)
    k = block_m + -(-t // block_m) + 6
    zmax = z64.abs().max(0).values
    tol_mean = k * U32 * zmax
    tol_m2 = k * U32 * m2 + 2 * k * U32 * zmax * torch.sqrt(t * m2) + t * (k * U32 * zmax) ** 2
    return tol_mean, tol_m2, mean, m2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_batch_moments_within_the_two_pass_bound(device, mode):
    """(count, bmean, bm2) against an fp64 two-pass reference of the kernel's own fp32 z, column by column, on
    ordinary and ill-conditioned columns (mean / std up to 1e4) with the running mean at 0, near the batch mean and
    far from it, T not a multiple of the tile (a short last row block). The tolerance is the error bound of the
    kernel's formulas (moments_bound), a few 1e-5 of M2 on the ordinary columns: a wrong count, a missing term, or
    a single-pass formula shifted by the running mean (error ~ u sum (z - mean_run)^2, i.e. ~ u (mean/std)^2 M2 at
    shift 0: 6x M2 on the (8, 8e-4) columns) fails it."""
    t = 200  # 13 row blocks of 16, the last one 8 rows
    x, w, b, mean, inv_var = _moment_inputs(device, t)
    z, _, _, (count, bmean, bm2) = fused_up_gelu_l2e(x, w, b, mean, inv_var, 1.0, 1e-6, "none", mode, config=SMALL)
    assert float(count) == t
    tol_mean, tol_m2, ref_mean, ref_m2 = moments_bound(z, SMALL.ew_block_m if mode == "split" else SMALL.mm_block_m)
    err_mean = (bmean.double().cpu() - ref_mean).abs()
    err_m2 = (bm2.double().cpu() - ref_m2).abs()
    assert (err_mean <= tol_mean).all(), (err_mean / tol_mean).max()
    assert (err_m2 <= tol_m2).all(), [(c, float(err_m2[c] / ref_m2[c])) for c in (err_m2 > tol_m2).nonzero().flatten()]
    # the bound is tight enough to mean something: ~1e-5 of M2 where the columns are well conditioned
    ordinary = slice(0, 9)
    assert (tol_m2[ordinary] / ref_m2[ordinary]).max() < 1e-3


# ---------------------------------------------------------------- forward/backward mask agreement (K2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("save", [True, False])
def test_backward_selects_what_the_forward_counted(device, mode, approximate, save):
    """The backward recomputes the selection from the saved (or recomputed) pre-activation: on data where
    many entries sit exactly at or next to tau (rows repeated, tau = one of those phi values and its fp32
    neighbours) the entries the backward treats as selected are exactly n_sel of the forward."""
    from neox_l2e.kernels.l2e_mlp.ops import _backward_du, _forward, _recompute_preact

    dtype = torch.float32
    g = torch.Generator().manual_seed(31)
    base, _, b, mean, inv_var, _ = _inputs("cpu", dtype, t=4, seed=31, ineligible_every=0)
    x = base.repeat(10, 1)[:T]  # 4 distinct rows: each phi value occurs ~9 times
    w = (torch.randn(N, H, generator=g) / math.sqrt(H)).to(dtype)
    u = x @ w.t() + b
    phi = (F.gelu(u, approximate=approximate) - mean) ** 2 * inv_var
    centre = float(phi.flatten().sort().values[phi.numel() // 2])
    x, w, b, mean, inv_var = (t.to(device) for t in (x, w, b, mean, inv_var))
    cfg = KernelConfig(**{**SMALL.__dict__, "save_preact": save})
    tanh = approximate == "tanh"
    one = torch.ones((), dtype=torch.float32, device=device)
    for tau in (centre, math.nextafter(centre, 0.0), math.nextafter(centre, math.inf)):
        out = _forward(x, w, b, mean, inv_var, tau, 1e-6, tanh, mode, cfg)
        n_sel, u_lin = int(out[2]), out[6]
        assert (u_lin is None) == (not save)
        if u_lin is None:
            u_lin = _recompute_preact(x, w, b, mode, cfg)
        du, _, _ = _backward_du(u_lin, False, None, one, mean, inv_var, tau, 1e-6, tanh, cfg)
        # with dL/dz absent du is nonzero exactly on the selection (d != 0 there; GELU' != 0 on this data)
        assert int((du != 0).sum()) == n_sel
        assert 0 < n_sel < x.shape[0] * N


def test_every_launch_pins_fp_fusion_off():
    """Bitwise agreement of the forward's and the backward's selection is by construction: every kernel is
    compiled with FP fusion (fma contraction) off, whatever Triton's default."""
    from neox_l2e.kernels.l2e_mlp import ops

    x, w, b, mean, inv_var, dz = (t.to("meta") for t in _inputs("cpu", torch.bfloat16, t=64, h=64, n=128))
    x.requires_grad_()
    with ops.record_launches() as launches:
        for mode in MODES:
            z, loss, _, _ = ops._apply_kernels(x, w, b, mean, inv_var, 1.0, 1e-6, "none", mode, ops.GPU_CONFIG)
            torch.autograd.backward([z, loss], [dz, torch.ones((), device="meta")])
    kinds = {ln.kernel for ln in launches}
    assert kinds == {"_split_fwd_kernel", "_gemm_fwd_kernel", "_merge_moments_kernel", "_bwd_kernel"}
    assert all(ln.options.get("enable_fp_fusion") is False for ln in launches)


def test_merge_grid_is_wide_at_the_pythia_widths():
    """The statistics merge runs on at least 128 programs at every Pythia MLP width (N = 4h, 2048 ... 20480):
    its column block is halved from 32 to 16 where N / 32 < 128; the block is a function of N alone."""
    from neox_l2e.kernels.l2e_mlp import ops

    seen = {}
    for h in (512, 768, 1024, 2048, 2560, 4096, 5120):
        n = 4 * h
        x = torch.empty((64, h), dtype=torch.bfloat16, device="meta")
        w = torch.empty((n, h), dtype=torch.bfloat16, device="meta")
        stats = torch.empty((n,), dtype=torch.float32, device="meta")
        with ops.record_launches() as launches:
            ops._apply_kernels(x, w, None, stats, stats, 1.0, 1e-6, "none", "split", ops.GPU_CONFIG)
        (merge,) = [ln for ln in launches if ln.kernel == "_merge_moments_kernel"]
        assert merge.grid[0] >= 128 and merge.grid[0] * merge.args["BLOCK_N"] >= n, (n, merge.grid)
        seen[n] = merge.args["BLOCK_N"]
    assert seen[2048] == seen[3072] == 16 and seen[4096] == seen[20480] == 32
    # the interpreter keeps few, large programs
    assert ops._merge_block_n(ops.INTERPRET_CONFIG, 2048) == ops.INTERPRET_CONFIG.merge_block_n


# ---------------------------------------------------------------- autograd details (K4)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_is_once_differentiable(device):
    x, w, b, mean, inv_var, dz = _inputs(device, torch.float32, seed=13)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    dzr = dz.clone().requires_grad_()  # the incoming gradient carries a graph: a double backward is asked for
    z, loss, _, _ = fused_up_gelu_l2e(xr, wr, b, mean, inv_var, 0.5, 1e-6, config=SMALL)
    (gx,) = torch.autograd.grad((z * dzr).sum() + loss, [xr], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.sum().backward()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_autocast_casts_like_f_linear(device, mode):
    """Under autocast with fp32 weights (mixed-precision training) the op casts x, W and b to the autocast
    dtype as F.linear does: same z as the op on the cast tensors, fp32 gradients equal to theirs."""
    if device == "cpu" and not interpreter_enabled():
        pytest.skip("CPU needs TRITON_INTERPRET=1")
    dt = torch.bfloat16
    x, w, b, mean, inv_var, dz = _inputs(device, torch.float32, seed=14)
    dz = dz.to(dt)
    tau, _ = pick_tau(oracle(x, w, b, mean, inv_var, math.inf, 1e-6, "none")["phi"].cpu(), inv_var)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    with torch.autocast(device, dtype=dt):
        z, loss, n_sel, _ = fused_up_gelu_l2e(*leaves, mean, inv_var, tau, 1e-6, "none", mode, config=SMALL)
        plain = F.linear(leaves[0], leaves[1], leaves[2])
    assert z.dtype == dt and plain.dtype == dt
    ((z.float() * dz.float()).sum() + 0.3 * loss).backward()
    cast = [t.to(dt).requires_grad_() for t in (x, w, b)]
    z2, loss2, n2, _ = fused_up_gelu_l2e(*cast, mean, inv_var, tau, 1e-6, "none", mode, config=SMALL)
    ((z2.float() * dz.float()).sum() + 0.3 * loss2).backward()
    assert torch.equal(z, z2) and torch.equal(loss, loss2) and int(n_sel) == int(n2)
    for a, c in zip(leaves, cast):
        assert a.grad.dtype == torch.float32 and torch.equal(a.grad, c.grad.float())
    with pytest.raises(ValueError, match="share"):  # outside autocast mixed dtypes are still an error
        fused_up_gelu_l2e(x.to(dt), w, b.to(dt), mean, inv_var, tau, 1e-6, config=SMALL)


# ---------------------------------------------------------------- L2E gradient kept off the input (H4)


def _reference_no_input_grad(x, w, b, mean, inv_var, tau, eps, approximate, dz, lam):
    """torch reference: z from x, the L2E loss from x.detach() (its gradient reaches W and b only)."""
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    br = b.clone().requires_grad_() if b is not None else None
    z = l2e_mlp_reference(xr, wr, br, mean, inv_var, tau, eps, approximate, round_preact=True)[0]
    _, loss, n_sel, _ = l2e_mlp_reference(xr.detach(), wr, br, mean, inv_var, tau, eps, approximate, round_preact=True)
    ((z.float() * dz.float()).sum() + lam * loss).backward()
    return dict(
        z=z.detach(),
        loss=loss.detach(),
        n_sel=int(n_sel),
        dx=xr.grad,
        dw=wr.grad,
        db=br.grad if br is not None else None,
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("save", [True, False])
def test_l2e_grad_to_input_false(device, mode, dtype, save):
    """l2e_grad_to_input=False: dx is bitwise the dx of the LM gradient alone (the op without the loss term),
    dW and db still carry the L2E term; all three match the torch reference with x.detach() for the loss."""
    x, w, b, mean, inv_var, dz = _inputs(device, dtype, seed=15)
    eps, lam = 1e-6, 0.9
    tau, _ = pick_tau(oracle(x, w, b, mean, inv_var, math.inf, eps, "none")["phi"].cpu(), inv_var)
    cfg = KernelConfig(**{**SMALL.__dict__, "save_preact": save})

    def run(with_loss, to_input, scale=lam):
        xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
        z, loss, n_sel, _ = fused_up_gelu_l2e(
            xr, wr, br, mean, inv_var, tau, eps, "none", mode, config=cfg, l2e_grad_to_input=to_input
        )
        total = (z.float() * dz.float()).sum() + (scale * loss if with_loss else 0.0)
        total.backward()
        return dict(z=z.detach(), n_sel=int(n_sel), dx=xr.grad, dw=wr.grad, db=br.grad)

    got = run(True, False)
    lm_only = run(False, True)
    full = run(True, True)
    assert torch.equal(got["dx"], lm_only["dx"])
    assert torch.equal(got["dx"], run(True, True, scale=0.0)["dx"])  # = the op at lambda 0 (g = 0)
    assert not torch.equal(got["dw"], lm_only["dw"]) and not torch.equal(got["db"], lm_only["db"])
    assert torch.equal(got["dw"], full["dw"]) and torch.equal(got["db"], full["db"])
    assert not torch.equal(got["dx"], full["dx"])
    ref = _reference_no_input_grad(x, w, b, mean, inv_var, tau, eps, "none", dz, lam)
    assert got["n_sel"] == ref["n_sel"] > 0
    red = RED_TOL[dtype]
    for k in ("dx", "dw", "db"):
        _close(got[k], ref[k], red, k)


@pytest.mark.parametrize("device", DEVICES)
def test_l2e_grad_to_input_false_loss_only(device):
    """Only the loss is used downstream: x gets no gradient from the op, W and b get the L2E term; with
    only x requiring a gradient, nothing reaches it."""
    x, w, b, mean, inv_var, _ = _inputs(device, torch.float32, seed=16)
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    _, loss, n_sel, _ = fused_up_gelu_l2e(xr, wr, br, mean, inv_var, 0.5, 1e-6, config=SMALL, l2e_grad_to_input=False)
    assert int(n_sel) > 0
    (xr.sum() * 0.0 + loss).backward()
    assert torch.equal(xr.grad, torch.zeros_like(x))
    ref = _reference_no_input_grad(x, w, b, mean, inv_var, 0.5, 1e-6, "none", torch.zeros_like(x @ w.t()), 1.0)
    _close(wr.grad, ref["dw"], RED_TOL[torch.float32], "dw")
    _close(br.grad, ref["db"], RED_TOL[torch.float32], "db")
    xo = x.clone().requires_grad_()
    _, loss, _, _ = fused_up_gelu_l2e(xo, w, b, mean, inv_var, 0.5, 1e-6, config=SMALL, l2e_grad_to_input=False)
    assert not loss.requires_grad or torch.autograd.grad(loss, [xo], allow_unused=True)[0] is None


def test_l2e_grad_to_input_false_torch_fallback(monkeypatch):
    """The torch fallback (CPU without the interpreter) honours the switch too."""
    x, w, b, mean, inv_var, dz = _inputs("cpu", torch.float32, seed=17)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    z, loss, _, _ = fused_up_gelu_l2e(xr, wr, br, mean, inv_var, 0.5, 1e-6, l2e_grad_to_input=False)
    ((z * dz).sum() + 0.7 * loss).backward()
    ref = _reference_no_input_grad(x, w, b, mean, inv_var, 0.5, 1e-6, "none", dz, 0.7)
    for got, k in ((xr.grad, "dx"), (wr.grad, "dw"), (br.grad, "db")):
        assert torch.equal(got, ref[k]), k


# ---------------------------------------------------------------- production launch configuration on a GPU (K3)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "mode,approximate,save,bias",
    [
        ("split", "none", True, True),
        ("split", "tanh", True, True),
        ("split", "none", False, True),
        ("split", "none", True, False),
        ("fused-gemm", "none", True, True),
        ("fused-gemm", "tanh", True, True),
        ("fused-gemm", "none", False, True),
        ("fused-gemm", "none", True, False),
    ],
)
@pytest.mark.parametrize("shape", [(2048, 512, 2048), (1000, 520, 1000)])
def test_gpu_production_config(mode, approximate, save, bias, shape):
    """GPU_CONFIG (the tiles and wgmma path the model uses) on tile-multiple and ragged shapes: tanh,
    recompute, no bias, fused-gemm; against the fp64 oracle, and save == recompute bitwise."""
    t, h, n = shape
    dtype = torch.bfloat16
    x, w, b, mean, inv_var, dz = _inputs("cuda", dtype, t=t, h=h, n=n, bias=bias, seed=18)
    tau, _ = pick_tau(oracle(x, w, b, mean, inv_var, math.inf, 1e-6, approximate)["phi"].cpu(), inv_var)
    ref = oracle(x, w, b, mean, inv_var, tau, 1e-6, approximate, dz=dz, lam=0.2)
    from neox_l2e.kernels.l2e_mlp import GPU_CONFIG

    cfg = KernelConfig(**{**GPU_CONFIG.__dict__, "save_preact": save})
    got = _run(x, w, b, mean, inv_var, tau, 1e-6, approximate, mode, dz, lam=0.2, cfg=cfg)
    rtol, atol = Z_TOL[dtype]
    torch.testing.assert_close(got["z"].double(), ref["z"].to(dtype).double(), rtol=rtol, atol=atol)
    assert abs(int(got["n_sel"]) - ref["n_sel"]) <= max(2, ref["n_sel"] // 200000)
    for k in ("bmean", "bm2", "dx", "dw") + (("db",) if bias else ()):
        _close(got[k], ref[k], RED_TOL[dtype], k)
    other = _run(
        x,
        w,
        b,
        mean,
        inv_var,
        tau,
        1e-6,
        approximate,
        mode,
        dz,
        lam=0.2,
        cfg=KernelConfig(**{**cfg.__dict__, "save_preact": not save}),
    )
    for k in ("z", "loss", "n_sel", "dx", "dw"):
        assert torch.equal(got[k], other[k]), k


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
def test_gpu_more_than_2_31_elements(mode):
    """T x N > 2^31 (64-bit offsets everywhere), with a stride-0 dL/dz (a broadcast gradient): z, dx of the
    last rows, the moments and the count against torch, computed in chunks."""
    t, h, n = 2**31 // 16384 + 64, 64, 16384
    g = torch.Generator(device="cuda").manual_seed(19)
    x = torch.randn(t, h, device="cuda", generator=g).bfloat16()
    w = (torch.randn(n, h, device="cuda", generator=g) / 8).bfloat16()
    b = (0.1 * torch.randn(n, device="cuda", generator=g)).bfloat16()
    mean, inv_var = torch.zeros(n, device="cuda"), torch.ones(n, device="cuda")
    dz = torch.ones(1, n, device="cuda", dtype=torch.bfloat16).expand(t, n)
    gl = torch.tensor(1e-3, device="cuda")
    xr = x.clone().requires_grad_()
    z, loss, n_sel, (count, bmean, bm2) = fused_up_gelu_l2e(xr, w, b, mean, inv_var, 1.0, 1e-6, "none", mode)
    torch.autograd.backward([z, loss], [dz, gl])
    assert float(count) == t
    tail = slice(t - 64, t)
    xt = x[tail].clone().requires_grad_()
    zt = F.gelu(F.linear(xt, w, b).float())
    sel = zt.detach() ** 2 >= 1.0
    (
        (zt * dz[tail].float()).sum() + gl * torch.log(torch.where(sel, zt * zt + 1e-6, torch.ones_like(zt))).sum()
    ).backward()
    torch.testing.assert_close(z[tail].float(), zt.detach().bfloat16().float(), rtol=1.6e-2, atol=1e-2)
    _close(xr.grad[tail], xt.grad, RED_TOL[torch.bfloat16], "dx (last rows)")
    total, cnt = torch.zeros(n, device="cuda", dtype=torch.float64), 0
    with torch.no_grad():
        for c0 in range(0, t, 8192):
            zc = F.gelu(F.linear(x[c0 : c0 + 8192], w, b).float())
            total += zc.double().sum(0)
            cnt += int((zc * zc >= 1.0).sum())
    _close(bmean, total / t, 1e-4, "bmean")
    assert abs(int(n_sel) - cnt) <= max(2, cnt // 100000)
