"""4 gloo ranks: TP=2 x DP=2 (ZeRO-1, L2E on) trains like TP=1 x DP=2 (2 ranks) on the same data: same losses,
same final weights and L2E state (statistics merged over DP in rank order, counts all-reduced over TP and DP).

Selection is a threshold (phi >= tau), and tau starts as the k-th largest phi. phi differs between the
layouts by fp32 rounding (other summation orders), and the k-th largest of a perturbed set moves by at most
the largest perturbation, so tau agrees to about that (measured ~2e-7 relative here, 2e-5 allowed); an
activation that close to tau can, rarely, flip. lambda is kept small here so such a flip cannot move the
weights measurably; the exact L2E comparison (loss, selections, tau) is tests/parallel/test_l2e_tp.py."""

import pytest
import torch
from distributed import run_ranks
from tp_common import gather_states, run_trainer, train_cfg

L2E = dict(
    l2e_enabled=True, l2e_layers=[0, 1], l2e_ratio=0.05, l2e_min_samples=16, l2e_backend="torch", l2e_lambda=1e-4
)


def _cfg(tp):
    # Adam's early steps are sign-like: a gradient that is pure rounding noise (dead units, the key bias) would
    # get an lr-sized step whose sign differs between layouts. A larger eps keeps such noise from being
    # amplified, so the final weights can be compared tightly.
    return train_cfg(
        optimizer={"type": "Adam", "params": {"lr": 0.01, "betas": [0.9, 0.95], "eps": 1e-3}},
        model_parallel_size=tp,
        zero_optimization={"stage": 1},
        train_micro_batch_size_per_gpu=2,
        train_iters=4,
        lr_decay_iters=4,
        **L2E,
    )


def _worker(rank, world, tp):
    from neox_l2e.parallel import ParallelState

    ps = ParallelState.from_distributed(tp=tp)
    losses, tr = run_trainer(_cfg(tp), ps)
    state = {k: v.detach().cpu().clone() for k, v in tr.module.state_dict().items()}
    full = gather_states(state, ps, tr.cfg) if tp > 1 else state
    # numpy, not tensors: torch shares tensor storage with the parent through file descriptors of this
    # process, which is gone by the time the parent reads the queue
    full = {k: v.numpy() for k, v in full.items()}
    return dict(losses=losses, state=full if ps.dp_rank == 0 else None, layout=(ps.tp, ps.dp, ps.tp_ranks, ps.dp_ranks))


@pytest.fixture(scope="module")
def runs():
    return run_ranks(_worker, world=4, args=(2,)), run_ranks(_worker, world=2, args=(1,))


def test_rank_layout(runs):
    tp2 = runs[0]
    assert [r["layout"] for r in tp2] == [
        (2, 2, (0, 1), (0, 2)),
        (2, 2, (0, 1), (1, 3)),
        (2, 2, (2, 3), (0, 2)),
        (2, 2, (2, 3), (1, 3)),
    ]


def test_tp2_dp2_matches_tp1_dp2(runs):
    tp2, tp1 = runs
    l2, l1 = dict(tp2[0]["losses"]), dict(tp1[0]["losses"])
    assert sorted(l2) == [1, 2, 3, 4] and l2[4] < l2[1]
    for it in l1:
        assert abs(l2[it] - l1[it]) <= 1e-5, (it, l2, l1)
    s2 = {k: torch.from_numpy(v) for k, v in tp2[0]["state"].items()}
    s1 = {k: torch.from_numpy(v) for k, v in tp1[0]["state"].items()}
    assert set(s2) == set(s1)
    assert any(".inhibitor.tau" in k and torch.isfinite(s1[k]) for k in s1)  # tau was initialised
    for k in s1:
        a, b = s1[k].double(), s2[k].double()
        assert torch.equal(a.isinf(), b.isinf()), k
        fin = torch.isfinite(a)
        if not fin.any():
            continue
        scale = max(1.0, a[fin].abs().max().item())
        tol = 2e-5 if k.endswith(".tau") else 1e-5  # tau: phi's rounding difference at the threshold (above)
        assert (a[fin] - b[fin]).abs().max().item() <= tol * scale, (k, a, b)
