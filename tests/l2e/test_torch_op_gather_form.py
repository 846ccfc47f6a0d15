"""The CPU (gather) form of the torch L2E op: z and the loss equal plain autograd through the formula bit for bit,
the gradients up to one rounding (the loss's part is added after the plain GELU backward: (dz + g) GELU'(u) becomes
dz GELU'(u) + g GELU'(u)); MEmeL's candidate top-k equals the full top-k; a checkpointing recompute reuses the
first selection."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as TF
from l2e_common import batch, layer_inputs, make_inhibitor
from torch.utils.checkpoint import checkpoint

from neox_l2e.l2e import commit_all
from neox_l2e.l2e import functional as F
from neox_l2e.l2e.metrics import BatchMetrics
from neox_l2e.l2e.torch_op import L2EForward, up_gelu_l2e

# the gradients of the gather form against plain autograd, relative to the gradient's largest entry: fp32 one rounding
# of dL/du on the selected entries, summed through the GEMMs; bf16: dL/du may round to the neighbouring bf16 value
_GRAD_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 1e-2)}


def _close_grads(a, c, dtype):
    rtol, scale = _GRAD_TOL[dtype]
    torch.testing.assert_close(a, c, rtol=rtol, atol=scale * float(c.abs().max()))


def _stats(n, seed=7):
    g = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(n, generator=g), 1.0 / (0.05 + torch.rand(n, generator=g))


def _plain_reference(x, w, b, mean, inv_var, tau, eps, approximate, grad_to_input, reflect_k=None):
    """Plain autograd through the formula: z32 = GELU(u.float()), the loss gathered by a boolean mask (row-major
    order), z = z32.to(x.dtype); MEmeL: torch.where(mask, 2 mean - z, z) with the full torch.topk."""
    u = TF.linear(x, w, b)
    z32 = TF.gelu(u.float(), approximate=approximate)
    phi = F.phi(z32, mean, inv_var)
    z = z32.to(x.dtype)
    if reflect_k is not None:
        mask = F.top_k_mask(phi, reflect_k)
        return torch.where(mask, (2.0 * mean).to(z.dtype) - z, z), None, mask
    mask = phi >= tau
    z_loss = z32 if grad_to_input else TF.gelu(TF.linear(x.detach(), w, b).float(), approximate=approximate)
    d = z_loss[mask] - mean.expand_as(z32)[mask]
    return z, torch.log(d * d + eps).sum(), mask


def _grads(fn, leaves, gz, w_loss=0.7):
    for t in leaves:
        t.grad = None
    z, loss = fn()
    total = (z.float() * gz).sum() + (w_loss * loss if loss is not None else 0.0)
    total.backward()
    return (
        z.detach(),
        None if loss is None else loss.detach(),
        [None if t.grad is None else t.grad.clone() for t in leaves],
    )


def _run(x, w, b, mean, inv_var, tau, eps, approximate, grad_to_input, gather):
    def fn():
        r = up_gelu_l2e(x, w, b, mean, inv_var, tau, eps, approximate, grad_to_input=grad_to_input, gather=gather)
        return r.z, r.loss_sum

    return fn


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grad_to_input", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(37, 12, 53), (64, 16, 128)])
def test_gather_form_equals_plain_autograd(dtype, grad_to_input, bias, shape):
    T, h, n = shape
    w, b = layer_inputs(h, n, seed=T)
    x = batch(T, h, seed=n).to(dtype).requires_grad_()
    w = w.to(dtype).requires_grad_()
    b = b.to(dtype).requires_grad_() if bias else None
    mean, inv_var = _stats(n)
    leaves = [t for t in (x, w, b) if t is not None]
    gz = torch.randn(T, n, generator=torch.Generator().manual_seed(3))
    tau, eps = 1.5, 1e-6
    for approximate in ("none", "tanh"):
        args = (x, w, b, mean, inv_var, tau, eps, approximate, grad_to_input)
        z0, l0, g0 = _grads(lambda args=args: _plain_reference(*args)[:2], leaves, gz)
        mask = _plain_reference(*args)[2]
        r = up_gelu_l2e(x, w, b, mean, inv_var, tau, eps, approximate, grad_to_input=grad_to_input)
        assert 0 < int(r.n_sel) == int(mask.sum()) < mask.numel()  # the shape selects some, not all
        assert torch.equal(r.sel, mask.reshape(-1).nonzero().squeeze(1))
        z1, l1, g1 = _grads(_run(*args, gather=True), leaves, gz)
        assert z1.dtype == dtype and torch.equal(z1, z0)
        assert torch.equal(l1, l0)
        for a, c in zip(g1, g0):  # one rounding apart on the selected entries' dL/du, then through the GEMMs
            _close_grads(a, c, dtype)
        # and the masked form (kept for devices where gathering would synchronise) gives the same
        z2, l2, g2 = _grads(_run(*args, gather=False), leaves, gz)
        assert torch.equal(z2, z0)
        torch.testing.assert_close(l2, l0, rtol=1e-6, atol=0)
        for a, c in zip(g2, g0):
            torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-7)


def test_gather_form_loss_only_and_z_only_backward():
    """An unused output gets no gradient (as plain autograd): loss only, z only."""
    w, b = layer_inputs(12, 40)
    mean, inv_var = _stats(40)
    x = batch(30, 12, seed=1).requires_grad_()
    wr = w.clone().requires_grad_()
    for use in ("loss", "z"):
        for gather in (True, False):
            x.grad = wr.grad = None
            r = up_gelu_l2e(x, wr, b, mean, inv_var, 1.0, 1e-6, gather=gather)
            (r.loss_sum if use == "loss" else r.z.sum()).backward()
            if gather:
                got = (x.grad.clone(), wr.grad.clone())
            else:
                assert torch.equal(got[0], x.grad) and torch.allclose(got[1], wr.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memel_gather_form_equals_plain_autograd(dtype):
    T, h, n = 50, 12, 64
    w, b = layer_inputs(h, n)
    x = batch(T, h, seed=2).to(dtype).requires_grad_()
    w, b = w.to(dtype).requires_grad_(), b.to(dtype).requires_grad_()
    mean, inv_var = _stats(n)
    k = 97
    gz = torch.randn(T, n, generator=torch.Generator().manual_seed(5))
    leaves = [x, w, b]
    z0, _, g0 = _grads(lambda: _plain_reference(x, w, b, mean, inv_var, None, 0.0, "none", True, k)[:2], leaves, gz)
    z1, _, g1 = _grads(lambda: (up_gelu_l2e(x, w, b, mean, inv_var, None, 1e-6, top_k=k).z, None), leaves, gz)
    assert torch.equal(z1, z0)
    for a, c in zip(g1, g0):
        assert torch.equal(a, c)
    r = up_gelu_l2e(x, w, b, mean, inv_var, None, 1e-6, top_k=k)
    assert int(r.n_sel) == k and r.sel.numel() == k


def _distinct_z(shape, seed):
    """z with distinct positive values, mean 0 and inv_var 1: phi = z^2 without ties, heavy-tailed."""
    n = shape[0] * shape[1]
    g = torch.Generator().manual_seed(seed)
    v = torch.linspace(0.0, 1.0, n + 1)[1:] ** 2 * 7.0
    z = v[torch.randperm(n, generator=g)].reshape(shape)
    return z, torch.zeros(shape[1]), torch.ones(shape[1])


@pytest.mark.parametrize("shape", [(16, 24), (300, 700), (517, 1031)])
@pytest.mark.parametrize("ratio", [0.01, 0.02, 0.3])
@pytest.mark.parametrize("level_bound", [None, 5.0])
def test_scan_top_k_equals_the_full_top_k(shape, ratio, level_bound):
    z, mean, inv_var = _distinct_z(shape, seed=shape[0])
    phi = F.phi(z, mean, inv_var)
    assert phi.unique().numel() == phi.numel()
    k = max(1, round(ratio * phi.numel()))
    sc = F.scan(z, mean, inv_var, top_k=k, level_bound=level_bound)
    want = torch.topk(phi.reshape(-1), k).indices
    assert sc.sel.numel() == k and torch.equal(sc.sel.sort().values, want.sort().values)
    assert torch.equal(phi.reshape(-1)[sc.sel], sc.sel_phi)
    assert sc.cand_phi is not None  # no fallback on such data
    assert sc.cand_phi.numel() == int((phi >= sc.bound).sum()) >= k  # every phi >= bound
    if level_bound is not None:
        assert float(sc.bound) <= level_bound
    # the moments and the phi sum are those of the unblocked formulas
    c, m, m2 = F.batch_moments(z)
    assert torch.equal(sc.moments[0], c)
    torch.testing.assert_close(sc.moments[1], m, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sc.moments[2], m2, rtol=1e-5, atol=0)
    torch.testing.assert_close(sc.phi_sum, phi.sum(), rtol=1e-5, atol=0)


def test_scan_top_k_falls_back_when_the_sample_misleads():
    """Sampled positions hold the largest values, the rest is small: the sample's bound leaves fewer than k
    candidates, and the full top-k is taken (still exact)."""
    n = 200 * 1000
    z = torch.rand(n, generator=torch.Generator().manual_seed(0))
    stride = n // F.TOP_K_SAMPLE
    stride += 1 - stride % 2
    sampled = torch.arange(0, n, stride)
    z[sampled] = 1000.0 + torch.arange(sampled.numel(), dtype=torch.float32)
    k = 4000
    sc = F.scan(z.reshape(200, 1000), torch.zeros(1000), torch.ones(1000), top_k=k, moments=False)
    assert sc.cand_phi is None and sc.bound is None and sc.phi is not None  # the fallback ran
    assert torch.equal(sc.sel.sort().values, torch.topk(z, k).indices.sort().values)


def test_scan_above_and_metrics_equal_the_dense_ones():
    torch.manual_seed(0)
    z = torch.rand(80, 96) * 6
    mean, inv_var = 0.2 * torch.rand(96), 0.5 + torch.rand(96)
    phi = F.phi(z, mean, inv_var)
    levels = [5.0, 10.0, 25.0]
    for tau in (3.0, 8.0, 30.0):
        sc = F.scan(z, mean, inv_var, tau=tau, level_bound=min(levels))
        mask = phi >= tau
        assert torch.equal(sc.sel, mask.reshape(-1).nonzero().squeeze(1))
        assert sc.bound == min(tau, 5.0) and sc.cand_phi.numel() == int((phi >= sc.bound).sum())
        r = L2EForward(z=z, loss_sum=None, n_sel=None, phi_sum=sc.phi_sum, sel=sc.sel, sel_phi=sc.sel_phi)
        r.cand_phi = sc.cand_phi
        n_sel = torch.tensor(sc.sel.numel())
        fast = BatchMetrics.of_selection(r, n_sel, 80, 96, levels, None)
        dense = BatchMetrics.of(phi, mask, n_sel, 80, 96, levels, None)
        for name in ("eligible", "selected", "scored", "selected_scored", "above_levels", "hit"):
            assert torch.equal(getattr(fast, name), getattr(dense, name)), name
        for name in ("phi_sum", "phi_sum_selected"):
            torch.testing.assert_close(getattr(fast, name), getattr(dense, name), rtol=1e-6, atol=0)


class _Block(nn.Module):
    def __init__(self, method, h=12, n=48):
        super().__init__()
        w, b = layer_inputs(h, n)
        self.up_w, self.up_b = nn.Parameter(w), nn.Parameter(b)
        self.down = nn.Linear(n, h)
        self.inhibitor = make_inhibitor(n=n, l2e_method=method, l2e_ratio=0.05)

    def forward(self, x):
        return self.down(self.inhibitor(x, self.up_w, self.up_b, "none"))


@pytest.mark.parametrize("method", ["l2e", "memel"])
def test_checkpoint_recompute_reuses_the_selection(method, monkeypatch):
    """Under non-reentrant checkpointing the recompute selects nothing anew (no phi, no selection call) and the
    gradients equal those without checkpointing."""
    calls = {"phi": 0, "select": 0}
    real_phi, real_scan = F.phi, F.scan

    def count(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)

        return wrapped

    monkeypatch.setattr(F, "phi", count("phi", real_phi))
    monkeypatch.setattr(F, "scan", count("select", real_scan))
    torch.manual_seed(0)
    plain, ck = _Block(method), _Block(method)
    ck.load_state_dict(plain.state_dict())
    selecting = 0
    for step in range(5):
        x = batch(40, seed=step).reshape(2, 20, 12)
        grads, used = [], []
        for block, ckpt in ((plain, False), (ck, True)):
            before = dict(calls)
            out = checkpoint(block, x, use_reentrant=False) if ckpt else block(x)
            loss = out.pow(2).mean()
            if block.inhibitor.loss is not None:
                loss = loss + 0.1 * block.inhibitor.loss
            loss.backward()
            selects = block.inhibitor.phase().value == "select"
            commit_all([block.inhibitor])
            grads.append([p.grad.clone() for p in block.parameters()])
            block.zero_grad()
            used.append({k: calls[k] - before[k] for k in calls})
        if selects:
            selecting += 1
            assert used[1] == used[0] and used[0]["select"] == 1  # the recompute scored and selected nothing
        for gp, gc in zip(*grads):
            assert torch.equal(gp, gc)
    assert selecting >= 2
    for k, v in plain.inhibitor.state_dict().items():
        assert torch.equal(v, ck.inhibitor.state_dict()[k]), k
