"""TP=2 through the project's Trainer with ZeRO-1 and ZeRO-2 (2 gloo ranks): the loss falls and a resume from a
step-3 checkpoint reproduces steps 4-6 exactly; resuming that checkpoint as TP=1 x DP=2 (without resharding) is
refused with one line naming the reshard tool. (TP=2 against TP=1 on the same data: test_tp_dp.py and
test_reshard_resume.py.)"""

import pytest
from distributed import run_ranks
from tp_common import run_trainer, train_cfg


def _worker(rank, world, tmp):
    from neox_l2e.parallel import ParallelState

    ps = ParallelState.from_distributed(tp=2)
    out = {}
    for stage in (1, 2):
        zero = {"stage": stage}
        ref, _ = run_trainer(train_cfg(model_parallel_size=2, zero_optimization=zero), ps)
        save = f"{tmp}/z{stage}"
        first, _ = run_trainer(train_cfg(model_parallel_size=2, zero_optimization=zero, train_iters=3, save=save), ps)
        resumed, tr = run_trainer(train_cfg(model_parallel_size=2, zero_optimization=zero, load=save), ps)
        out[stage] = dict(ref=ref, first=first, resumed=resumed, start=tr.iteration)
    # the TP=2 checkpoint in another layout (TP=1 x DP=2 on the same 2 ranks), not resharded: refused up front
    from neox_l2e.training import CheckpointError

    try:
        run_trainer(train_cfg(zero_optimization={"stage": 1}, load=f"{tmp}/z1"), ParallelState.from_distributed(tp=1))
        out["other_layout"] = None
    except CheckpointError as e:
        out["other_layout"] = str(e)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_ranks(_worker, world=2, args=(str(tmp_path_factory.mktemp("tp2train")),))


@pytest.mark.parametrize("stage", [1, 2])
def test_tp2_zero_trains_and_resumes_exactly(results, stage):
    r = results[0][stage]
    losses = [l for _, l in r["ref"]]
    assert len(losses) == 6
    assert losses[-1] < losses[0] - 0.3, losses
    assert [l for _, l in r["first"]] == pytest.approx(losses[:3], abs=1e-6)
    resumed = dict(r["resumed"])
    assert sorted(resumed) == [4, 5, 6]
    for it in (4, 5, 6):
        assert abs(resumed[it] - dict(r["ref"])[it]) <= 1e-6, (it, resumed, r["ref"])
    # every rank logs the same (all-reduced) loss
    assert results[1][stage]["ref"] == r["ref"]


def test_resume_in_another_layout_is_refused(results):
    for r in results:
        msg = r["other_layout"]
        assert msg is not None and "\n" not in msg
        assert "global_step3: saved as TP=2 x DP=1, this run is TP=1 x DP=2" in msg, msg
        assert "tools/reshard_checkpoint.py" in msg and "--tp 1 --dp 2" in msg, msg
