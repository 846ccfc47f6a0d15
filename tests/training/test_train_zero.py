"""ZeRO 1 (gas 2), 2 (L2E on) and 3 on 2 gloo ranks: the loss falls, save/load is exact (L2E buffers
included), resume equals an uninterrupted run bitwise (fp32), and a NaN loss on one rank is skipped on
both (no weight, Adam or schedule change); too many bad steps stop every rank."""

import pytest
import torch
from distributed import run_ranks

STEPS, SPLIT = 6, 3


def _run(cfg_kw, tmp, ds):
    from train_common import full_state, tiny_cfg

    from neox_l2e.training.loop import Trainer

    out = {}
    # uninterrupted
    ta = Trainer(tiny_cfg(train_iters=STEPS, lr_decay_iters=STEPS, **cfg_kw), datasets=ds, quiet=True)
    a = ta.train()
    out["optimizer_steps"] = ta.engine.global_steps  # one DeepSpeed step per iteration, whatever gas
    del ta
    out["uninterrupted"] = [l for _, l in a.train_losses]
    out["valid"] = a.valid_losses
    # first half, saved
    save = str(tmp)
    t1 = Trainer(tiny_cfg(train_iters=SPLIT, lr_decay_iters=STEPS, save=save, **cfg_kw), datasets=ds, quiet=True)
    r1 = t1.train()
    saved = full_state(t1)
    del t1
    # second half, resumed
    t2 = Trainer(
        tiny_cfg(train_iters=STEPS, lr_decay_iters=STEPS, save=save, load=save, **cfg_kw), datasets=ds, quiet=True
    )
    loaded = full_state(t2)
    out["resumed_at"] = t2.iteration
    out["consumed"] = t2.consumed
    if saved is not None:
        out["l2e_buffers"] = sorted(k for k in saved if ".inhibitor." in k)
        out["exact_load"] = saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    r2 = t2.train()
    out["resumed"] = [l for _, l in r1.train_losses + r2.train_losses]
    if cfg_kw["zero_optimization"]["stage"] == 3:
        # no-load-optim: ZeRO-3 cannot take its weights from the optimizer shards; they come from the consolidated
        # mp_rank_00 weights, so the run starts from the checkpoint's weights, not from a fresh init
        final_saved = full_state(t2)
        del t2
        t3 = Trainer(
            tiny_cfg(train_iters=STEPS + 1, lr_decay_iters=STEPS, load=save, no_load_optim=True, **cfg_kw),
            datasets=ds,
            quiet=True,
        )
        got = full_state(t3)
        out["no_load_optim_iteration"] = t3.iteration
        if final_saved is not None:
            out["no_load_optim_exact"] = got.keys() == final_saved.keys() and all(
                torch.equal(final_saved[k], got[k]) for k in final_saved
            )
    return out


def _nan_run(rank, tmp, ds):
    """Stage 2, NaN injected on rank 1 only at iteration 1: both ranks skip; weights and Adam state unchanged."""
    from train_common import full_state, inject_loss, tiny_cfg

    from neox_l2e.training.faults import TrainingError
    from neox_l2e.training.loop import Trainer

    def hook(it, loss):
        return loss * float("nan") if (it == 1 and rank == 1) else loss

    with inject_loss(hook):
        tr = Trainer(tiny_cfg(zero_optimization={"stage": 2}, train_iters=4), datasets=ds, quiet=True)
        tr.train_step()
        before = full_state(tr)
        adam_steps = [int(s["step"]) for s in tr.optimizer.state.values()]
        lr_iters = tr.scheduler.num_iters
        s = tr.train_step()
        after = full_state(tr)
        out = {
            "bad": s.bad,
            "applied": s.applied,
            "unchanged": all(torch.equal(before[k], after[k]) for k in before),
            "adam_unchanged": adam_steps == [int(s["step"]) for s in tr.optimizer.state.values()],
            "lr_unchanged": lr_iters == tr.scheduler.num_iters,
            "iteration": tr.iteration,
        }
        s = tr.train_step()
        out["next_applied"] = s.applied
        out["changed_after"] = not all(torch.equal(after[k], v) for k, v in full_state(tr).items())
        # through the loop: the skipped step is counted in the result (and logged as NaN)
        res = Trainer(tiny_cfg(zero_optimization={"stage": 2}, train_iters=3), datasets=ds, quiet=True).train()
    out["result_skipped"] = res.skipped_steps
    out["result_losses"] = [l for _, l in res.train_losses]
    # too many consecutive bad steps stop training on every rank
    with inject_loss(lambda it, loss: loss * float("inf") if it >= 2 and rank == 0 else loss):
        tr2 = Trainer(tiny_cfg(train_iters=10, max_bad_steps=2), datasets=ds, quiet=True)
        try:
            tr2.train()
            out["stopped"] = None
        except TrainingError as e:
            out["stopped"] = str(e)
    out["stopped_at"] = tr2.iteration
    return out


def _worker(rank, world, tmp):
    from pathlib import Path

    from train_common import datasets

    ds = datasets()
    res = {}
    res[1] = _run({"zero_optimization": {"stage": 1}, "gas": 2}, Path(tmp) / "z1", ds)
    res[2] = _run({"zero_optimization": {"stage": 2}, "l2e_enabled": True}, Path(tmp) / "z2", ds)  # L2E on
    res[3] = _run({"zero_optimization": {"stage": 3}}, Path(tmp) / "z3", ds)
    res["nan"] = _nan_run(rank, Path(tmp) / "nan", ds)
    return res


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_ranks(_worker, world=2, args=(str(tmp_path_factory.mktemp("zero")),), timeout=600)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_loss_falls(results, stage):
    for r in results:
        losses = r[stage]["uninterrupted"]
        assert len(losses) == STEPS
        assert losses[-1] < losses[0] - 0.3, losses
        assert r[stage]["valid"] and r[stage]["valid"][-1][1] < losses[0]
    assert results[0][stage]["uninterrupted"] == results[1][stage]["uninterrupted"]  # loss is DP-averaged
    assert results[0][stage]["optimizer_steps"] == STEPS


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_save_load_exact(results, stage):
    r = results[0][stage]
    assert r["exact_load"] is True
    assert r["resumed_at"] == SPLIT
    if stage == 2:  # the L2E state travels in the checkpoint
        assert {k.rsplit(".", 1)[1] for k in r["l2e_buffers"]} >= {"count", "mean", "m2", "tau", "step"}
    gas = 2 if stage == 1 else 1
    assert r["consumed"] == SPLIT * 4 * gas * 2  # micro-batch 4 x gas x DP 2


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_resume_equals_uninterrupted_bitwise(results, stage):
    for r in results:
        assert r[stage]["resumed"] == r[stage]["uninterrupted"]  # float equality, not approx


def test_nan_on_one_rank_is_skipped_everywhere(results):
    for r in results:
        n = r["nan"]
        assert n["bad"] is True and n["applied"] is False
        assert n["iteration"] == 2
        assert n["lr_unchanged"] and n["adam_unchanged"]
        assert n["next_applied"] is True
        assert n["result_skipped"] == 1  # counted in TrainResult.skipped_steps
        losses = n["result_losses"]
        assert len(losses) == 3 and losses[1] != losses[1] and losses[0] == losses[0] and losses[2] == losses[2]
    assert results[0]["nan"]["unchanged"] is True and results[0]["nan"]["changed_after"] is True


def test_zero3_resume_without_optimizer_keeps_the_weights(results):
    r = results[0][3]
    assert r["no_load_optim_iteration"] == STEPS
    assert r["no_load_optim_exact"] is True


def test_max_bad_steps_stops_all_ranks(results):
    for r in results:
        assert r["nan"]["stopped"] is not None and "max-bad-steps = 2" in r["nan"]["stopped"]
        assert r["nan"]["stopped_at"] == 4
