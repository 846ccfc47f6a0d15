"""The model-parallel RNG tracker: separate streams, save/restore, replay under activation checkpointing."""

import pytest
import torch
from distributed import run_ranks
from tp_common import tiny_cfg, tokens

from neox_l2e.model import GPTNeoX
from neox_l2e.parallel import ParallelState, RNGTracker


def test_fork_uses_its_own_stream_and_leaves_the_shared_one_alone():
    t = RNGTracker("cpu")
    t.seed(5, tp_rank=0)
    a = torch.rand(4)
    t.seed(5, tp_rank=0)
    with t.fork():
        f = torch.rand(4)
    b = torch.rand(4)
    assert torch.equal(a, b)  # the fork did not advance the shared stream
    assert not torch.equal(f, a)
    t1 = RNGTracker("cpu")
    t1.seed(5, tp_rank=1)
    with t1.fork():
        f1 = torch.rand(4)
    assert not torch.equal(f, f1)  # TP ranks draw different attention-dropout masks


def test_get_set_states_resume_every_stream():
    t = RNGTracker("cpu")
    t.seed(9)
    torch.rand(3)
    with t.fork():
        torch.rand(3)
    saved = t.get_states()
    with t.fork():
        want_fork = torch.rand(5)
    want_shared = torch.rand(5)
    t2 = RNGTracker("cpu")
    t2.seed(1234)
    t2.set_states(saved)
    with t2.fork():
        got_fork = torch.rand(5)
    assert torch.equal(got_fork, want_fork)
    assert torch.equal(torch.rand(5), want_shared)


def _loss_and_grads(cfg):
    model = GPTNeoX(cfg, ParallelState.single(), seed=cfg.training.seed).train()
    model.ps.rng.seed(11)
    batch = tokens(cfg)
    loss = model.lm_loss(model(batch[:, :-1]).logits, batch[:, 1:])
    loss.backward()
    return loss.item(), {k: p.grad.clone() for k, p in model.named_parameters()}


def test_activation_checkpointing_replays_attention_dropout():
    base = dict(attention_dropout=0.3, hidden_dropout=0.1)
    l0, g0 = _loss_and_grads(tiny_cfg(**base))
    l1, g1 = _loss_and_grads(tiny_cfg(checkpoint_activations=True, **base))
    assert l0 == l1
    assert max((g0[k] - g1[k]).abs().max().item() for k in g0) <= 1e-6
    l2, _ = _loss_and_grads(tiny_cfg(attention_dropout=0.3, hidden_dropout=0.1, seed=8))
    assert l2 != l0  # dropout is on: the comparison is not vacuous


def _worker(rank, world):
    ps = ParallelState.from_distributed(tp=2, seed=3)
    with ps.rng.fork():
        mine = torch.rand(4)
    shared = torch.rand(4)
    ps.check_shared_rng()  # consistent: passes
    if rank == 1:
        torch.rand(1)  # one rank draws once more
    try:
        ps.check_shared_rng()
        caught = False
    except RuntimeError:
        caught = True
    return mine.tolist(), shared.tolist(), caught  # plain lists: no tensor storage shared with the parent


def test_tp_ranks_share_the_default_stream_and_differ_in_the_model_parallel_one():
    (m0, s0, c0), (m1, s1, c1) = run_ranks(_worker, world=2)
    assert s0 == s1
    assert m0 != m1
    assert c0 and c1  # both ranks detect the diverged shared stream


@pytest.mark.gpu
def test_tracker_on_cuda_forks_the_device_generator():
    dev = torch.device("cuda", torch.cuda.current_device())
    t = RNGTracker(dev)
    t.seed(5, tp_rank=1)
    a = torch.rand(4, device=dev)
    t.seed(5, tp_rank=1)
    with t.fork():
        f = torch.rand(4, device=dev)
    assert torch.equal(torch.rand(4, device=dev), a)
    saved = t.get_states()
    with t.fork():
        want = torch.rand(4, device=dev)
    t.set_states(saved)
    with t.fork():
        assert torch.equal(torch.rand(4, device=dev), want)
    assert not torch.equal(f, a)
