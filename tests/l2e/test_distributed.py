"""Data- and tensor-parallel behaviour on 2 gloo ranks (tests/distributed.run_ranks)."""

import torch
import torch.nn.functional as TF
from distributed import run_ranks
from l2e_common import batch, layer_inputs, make_inhibitor

from neox_l2e.l2e import functional as F
from neox_l2e.l2e import stats as S

H, N, T = 12, 32, 48


def _np(t):
    """Results cross the process boundary as numpy arrays (pickled by value): torch tensors would travel through
    torch's shared-memory file-descriptor passing, which depends on sockets in a temp folder."""
    return t.detach().cpu().numpy().copy()


def _sd(inh):
    return {k: _np(v) for k, v in inh.state_dict().items()}


def _t(results):
    """numpy arrays back to tensors, recursively."""
    import numpy as np

    if isinstance(results, np.ndarray):
        return torch.from_numpy(results)
    if isinstance(results, dict):
        return {k: _t(v) for k, v in results.items()}
    if isinstance(results, (list, tuple)):
        return type(results)(_t(v) for v in results)
    return results


def _dp_data(rank, step):
    # every rank its own data, with a different distribution per rank
    return batch(T, H, seed=1000 * rank + step, shift=0.3 * rank)


def _dp_worker(rank, world, steps):
    from neox_l2e.parallel import ParallelState

    ps = ParallelState.from_distributed(tp=1, device="cpu")
    assert ps.dp == 2 and ps.dp_rank == rank
    w, b = layer_inputs(H, N)
    w.requires_grad_()
    inh = make_inhibitor(n=N, ps=ps, l2e_min_samples=T)
    before_init = None
    taus = []
    for step in range(steps):
        if step == 1:
            before_init = (_np(inh.mean), _np(inh.inv_var))
        x = _dp_data(rank, step)
        inh(x, w, b, "none")
        if inh.loss is not None:
            inh.loss.backward()
        inh.commit()
        taus.append(inh.tau_value)
    m = inh.metrics()
    return _sd(inh), taus, before_init, m, _np(w.grad)


def test_two_dp_ranks_keep_bit_identical_statistics_and_tau():
    steps = 12
    (s0, t0, init0, m0, g0), (s1, t1, init1, m1, g1) = _t(run_ranks(_dp_worker, world=2, args=(steps,)))
    assert not torch.equal(g0, g1)  # the ranks really saw different data
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k
    assert t0 == t1 and m0 == m1
    # the statistics are those of all data seen by both ranks (fp64 two-pass reference)
    w, b = layer_inputs(H, N)
    w, b = w.detach(), b.detach()
    zs = [TF.gelu(TF.linear(_dp_data(r, s), w, b)) for s in range(steps) for r in range(2)]
    c, mean, m2 = S.two_pass_moments64(torch.cat(zs))
    assert s0["count"][0].item() == float(c) == 2 * T * steps
    torch.testing.assert_close(s0["mean"].double(), mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(s0["m2"].double(), m2, rtol=1e-5, atol=1e-6)
    # tau was initialised from the exact quantile of the union of both ranks' phi of the eligible batch
    assert torch.equal(init0[0], init1[0])
    mean1, inv_var1 = init0
    phi = torch.cat([F.phi(TF.gelu(TF.linear(_dp_data(r, 1), w, b)), mean1, inv_var1) for r in range(2)])
    k = S.kth_index(0.02, phi.numel())
    assert t0[1] == torch.topk(phi.flatten(), k).values[-1].item()
    assert len(set(t0[2:])) > 3  # and then it moved


def _tp_worker(rank, world, steps):
    from neox_l2e.parallel import ParallelState

    ps = ParallelState.from_distributed(tp=2, device="cpu")
    assert ps.tp == 2 and ps.dp == 1
    w, b = layer_inputs(H, N)
    sl = slice(rank * N // 2, (rank + 1) * N // 2)
    wp, bp = w[sl].clone().requires_grad_(), b[sl].clone().requires_grad_()
    inh = make_inhibitor(n=N // 2, ps=ps)
    losses = []
    for step in range(steps):
        x = batch(T, H, seed=step)  # TP ranks see the same input
        inh(x, wp, bp, "none")
        if inh.loss is not None:
            inh.loss.backward()
            losses.append(inh.loss.item())
        inh.commit()
    return _sd(inh), losses, _np(wp.grad), inh.metrics()


def test_two_tp_ranks_equal_one_rank_with_all_neurons():
    steps = 10
    (s0, l0, g0, m0), (s1, l1, g1, m1) = _t(run_ranks(_tp_worker, world=2, args=(steps,)))
    w, b = layer_inputs(H, N)
    wp, bp = w.clone().requires_grad_(), b.clone().requires_grad_()
    ref = make_inhibitor(n=N)
    losses = []
    for step in range(steps):
        ref(batch(T, H, seed=step), wp, bp, "none")
        if ref.loss is not None:
            ref.loss.backward()
            losses.append(ref.loss.item())
        ref.commit()
    assert l0 == l1  # the loss is TP-global
    torch.testing.assert_close(torch.tensor(l0), torch.tensor(losses), rtol=1e-5, atol=1e-6)
    assert s0["tau"].item() == s1["tau"].item()  # tau is TP-global
    torch.testing.assert_close(s0["tau"], ref.tau, rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.cat([s0["mean"], s1["mean"]]), ref.mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.cat([s0["m2"], s1["m2"]]), ref.m2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([g0, g1]), wp.grad, rtol=1e-4, atol=1e-6)
    mr = ref.metrics()
    assert m0 == m1
    for key in ("frac_selected", "neurons_hit", "phi_mean_all", "loss_ms"):
        assert abs(m0[key] - mr[key]) <= 1e-4 * max(1.0, abs(mr[key])), key
