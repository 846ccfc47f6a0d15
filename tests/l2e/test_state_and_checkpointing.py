"""state_dict round trips (continue after reload == continue without) and activation checkpointing."""

import copy
import io

import torch
import torch.nn as nn
from l2e_common import batch, layer_inputs, make_inhibitor, run_stream
from torch.utils.checkpoint import checkpoint

from neox_l2e.l2e import commit_all, total_loss


def _snapshot(inh):
    return {k: v.clone() for k, v in inh.state_dict().items()}, inh.tau_value


def test_state_dict_has_the_buffers():
    inh = make_inhibitor()
    sd = inh.state_dict()
    assert {"count", "mean", "m2", "tau", "step", "commits", "total_selected", "total_eligible"} <= set(sd)
    assert "inv_var" not in sd  # derived, recomputed on load
    assert sd["count"].dtype == torch.float64 and sd["mean"].dtype == torch.float32
    assert sd["tau"].dim() == 0 and torch.isinf(sd["tau"])


def test_continue_after_reload_equals_continue_without():
    w, b = layer_inputs()
    a = make_inhibitor(l2e_warmup_steps=2)
    for s in range(12):
        a.set_step(s)
        run_stream(a, w, b, steps=1, seed0=s)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b_ = make_inhibitor(l2e_warmup_steps=2)  # a fresh module, as after a restart
    b_.load_state_dict(torch.load(buf))
    assert b_.tau_value == a.tau_value
    for inh in (a, b_):
        run_stream(inh, w, b, steps=15, seed0=100)
    sa, ta = _snapshot(a)
    sb, tb = _snapshot(b_)
    assert ta == tb
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert torch.equal(a.inv_var, b_.inv_var)
    assert int(a.commits) == 27 and int(a.step) == 11


def test_reload_restores_warmup_step():
    w, b = layer_inputs()
    a = make_inhibitor(l2e_warmup_steps=5)
    a.set_step(7)
    run_stream(a, w, b, steps=3)
    c = make_inhibitor(l2e_warmup_steps=5)
    c.load_state_dict(a.state_dict())  # set_step not called again: still past warm-up
    c(batch(64, seed=50), w, b, "none")
    a(batch(64, seed=50), w, b, "none")
    assert c.loss is not None
    torch.testing.assert_close(c.loss, a.loss, rtol=0, atol=0)


class _Block(nn.Module):
    def __init__(self, h=12, n=32):
        super().__init__()
        w, b = layer_inputs(h, n)
        self.up_w, self.up_b = nn.Parameter(w), nn.Parameter(b)
        self.down = nn.Linear(n, h)
        self.inhibitor = make_inhibitor(n=n)

    def forward(self, x):
        return self.down(self.inhibitor(x, self.up_w, self.up_b, "none"))


def _train_step(block, x, ckpt):
    out = checkpoint(block, x, use_reentrant=False) if ckpt else block(x)
    loss = out.pow(2).mean()
    l2e = total_loss([block.inhibitor])
    if l2e is not None:
        loss = loss + 0.1 * l2e
    loss.backward()
    commit_all([block.inhibitor])
    grads = [p.grad.clone() for p in block.parameters()]
    block.zero_grad()
    return grads


def test_activation_checkpoint_recompute_does_not_double_count():
    torch.manual_seed(0)
    plain, ck = _Block(), _Block()
    ck.load_state_dict(plain.state_dict())
    calls = []
    ck.inhibitor.register_forward_hook(lambda *a: calls.append(1))
    T = 2 * 24
    for step in range(6):
        x = batch(T, seed=step).reshape(2, 24, 12)
        g_plain = _train_step(plain, x, ckpt=False)
        g_ck = _train_step(ck, x, ckpt=True)
        assert ck.inhibitor.count[0].item() == (step + 1) * T  # T per micro-batch, not 2T
        assert int(ck.inhibitor.commits) == step + 1
        assert len(calls) == 2 * (step + 1)  # the recompute did run the inhibitor
        for gp, gc in zip(g_plain, g_ck):  # the L2E gradient flows through the recompute
            torch.testing.assert_close(gc, gp, rtol=1e-6, atol=1e-7)
    assert ck.inhibitor.loss is not None
    for k, v in plain.inhibitor.state_dict().items():
        assert torch.equal(v, ck.inhibitor.state_dict()[k]), k
    mp, mc = plain.inhibitor.metrics(), ck.inhibitor.metrics()
    # metrics not double-counted either: micro-batch 0 only gathered statistics, 1 initialised tau, 2..5 selected
    assert mp == mc and mc["batches"] == 4


def test_deepcopy_keeps_host_state():
    w, b = layer_inputs()
    a = make_inhibitor()
    run_stream(a, w, b, steps=4)
    c = copy.deepcopy(a)
    assert c.tau_value == a.tau_value and c.eligible


def test_low_precision_casts_do_not_touch_the_statistics():
    """model.half() / .bfloat16() / .to(dtype) (e.g. an engine's bf16 cast) leave the buffers' dtypes and values."""
    w, b = layer_inputs()
    a = make_inhibitor()
    run_stream(a, w, b, steps=4)
    a.count.add_(1e6 + 0.5)  # a value fp16 / bf16 / fp32 cannot hold
    before = {k: v.clone() for k, v in a.state_dict().items()}
    block = torch.nn.Sequential(torch.nn.Linear(2, 2), a)
    block.half()
    block.bfloat16()
    block.to(torch.float16)
    block.float()
    assert block[0].weight.dtype == torch.float32
    for k, v in a.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
    assert a.inv_var.dtype == torch.float32


def test_discard_drops_the_pending_micro_batch():
    """A discarded forward (the loop's NaN/inf skip) leaves statistics, tau, counters and metrics as if it
    never ran: the run equals one that skipped that micro-batch."""
    w, b = layer_inputs()
    kept, skipped = make_inhibitor(), make_inhibitor()
    run_stream(kept, w, b, steps=20)
    run_stream(skipped, w, b, steps=20)
    for inh in (kept, skipped):
        inh.metrics()  # start a fresh metrics window
    poisoned = batch(64, seed=500)
    poisoned[3] = float("nan")
    skipped(poisoned, w, b, "none")
    assert skipped.loss is not None
    skipped.discard()
    assert skipped.loss is None and skipped.n_selected is None
    skipped.commit()  # nothing pending: a no-op
    for inh in (kept, skipped):
        run_stream(inh, w, b, steps=5, seed0=600)
    sk, tk = _snapshot(kept)
    ss, ts = _snapshot(skipped)
    assert tk == ts and all(torch.equal(sk[k], ss[k]) for k in sk)
    mk, ms = kept.metrics(), skipped.metrics()
    assert mk == ms and mk["batches"] == 5.0
