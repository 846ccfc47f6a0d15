"""ParallelState and the configuration's parallel checks (single process)."""

import pytest
import torch
from tp_common import tiny_cfg

from neox_l2e.config import ConfigError
from neox_l2e.model import GPTNeoX
from neox_l2e.parallel import ParallelState
from neox_l2e.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding


def test_zero3_with_tp_is_refused_at_load():
    with pytest.raises(ConfigError, match=r"ZeRO stage 3 with model-parallel-size 2 is not supported"):
        tiny_cfg(model_parallel_size=2, zero_optimization={"stage": 3})
    for stage in (0, 1, 2):  # ZeRO 1 and 2 combine with TP (NeoX itself allows only 1)
        assert tiny_cfg(model_parallel_size=2, zero_optimization={"stage": stage}).zero_stage == stage
    assert tiny_cfg(zero_optimization={"stage": 3}).zero_stage == 3  # ZeRO-3 alone is fine


@pytest.mark.parametrize("pp", [2, 4])
def test_pipeline_parallelism_is_refused(pp):
    with pytest.raises(ConfigError, match=r"pipeline parallelism is not implemented"):
        tiny_cfg(pipe_parallel_size=pp)
    for ok in (0, 1):
        tiny_cfg(pipe_parallel_size=ok)


def test_tp_must_divide_heads_and_world():
    with pytest.raises(ConfigError, match=r"does not divide"):
        tiny_cfg(model_parallel_size=3)
    cfg = tiny_cfg(model_parallel_size=2)
    assert cfg.check_world_size(4) == 2
    with pytest.raises(ConfigError, match=r"does not divide the world size 3"):
        cfg.check_world_size(3)


def test_single_process_state_and_no_op_collectives(monkeypatch):
    # no process group, whatever an in-process training test left initialised earlier in this interpreter
    # (destroying it would break the DeepSpeed groups that later in-process tests reuse)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    ps = ParallelState.single()
    t = torch.ones(3)
    assert ps.all_reduce_tp(t) is t and ps.all_reduce_dp(t) is t and ps.all_gather_dp(t) == [t]
    assert (ps.get_model_parallel_world_size(), ps.get_data_parallel_world_size()) == (1, 1)
    assert ParallelState.from_distributed(tp=1).tp == 1
    with pytest.raises(ValueError, match="needs torch.distributed"):
        ParallelState.from_distributed(tp=2)
    with pytest.raises(ValueError, match="bad tensor-parallel layout"):
        ParallelState(tp=2, tp_rank=2)


def test_layers_mark_sharded_params_for_deepspeed():
    ps = ParallelState.layout(2, 1, device="meta")
    col, row, emb = ColumnParallelLinear(8, 4, ps), RowParallelLinear(8, 4, ps), VocabParallelEmbedding(16, 4, ps)
    assert col.weight.shape == (2, 8) and col.weight.tensor_model_parallel and col.weight.partition_dim == 0
    assert col.bias.tensor_model_parallel
    assert row.weight.shape == (4, 4) and row.weight.tensor_model_parallel and row.weight.partition_dim == 1
    assert row.bias.shape == (4,) and not row.bias.tensor_model_parallel and row.bias.tp_partition_dim is None
    assert emb.weight.shape == (8, 4) and (emb.vocab_start, emb.vocab_end) == (8, 16)


def test_meta_model_and_parameter_count_at_any_tp():
    cfg = tiny_cfg()
    full = GPTNeoX(cfg, ParallelState.layout(1, 0, device="meta"), init=False).num_parameters()
    two = GPTNeoX(cfg, ParallelState.layout(2, 0, device="meta"), init=False)
    assert two.vocab_size == 112 and two.base_vocab_size == 104
    assert two.num_parameters() >= full


@pytest.fixture
def restore_timeouts():
    """set_collective_timeout changes module state of torch and of neox_l2e.parallel.state: put both back."""
    from torch.distributed import distributed_c10d as c10d

    from neox_l2e.parallel import state

    saved = (state._TIMEOUT, c10d.default_pg_timeout, getattr(c10d, "default_pg_nccl_timeout", None))
    yield
    state._TIMEOUT, c10d.default_pg_timeout = saved[:2]
    if saved[2] is not None:
        c10d.default_pg_nccl_timeout = saved[2]


def test_collective_timeout_becomes_torchs_default_for_new_groups(restore_timeouts):
    import datetime

    from torch.distributed import distributed_c10d as c10d

    from neox_l2e.parallel import collective_timeout, set_collective_timeout

    set_collective_timeout(7)
    assert collective_timeout() == datetime.timedelta(seconds=7)
    # what new_group() without timeout= (DeepSpeed's groups) uses
    assert c10d._get_default_timeout(c10d.Backend("gloo")) == datetime.timedelta(seconds=7)
    for bad in (0, -1, float("nan"), float("inf"), "abc", None, True):
        with pytest.raises(ConfigError, match=r"dist-timeout-s .*: must be a positive number of seconds"):
            set_collective_timeout(bad)
    assert collective_timeout() == datetime.timedelta(seconds=7)  # a refused value changes nothing


def _groups_worker(rank, world):
    import time

    import torch.distributed as dist

    from neox_l2e.parallel import ParallelState

    ps = ParallelState.from_distributed(tp=1, timeout_s=3)
    later = dist.new_group([0, 1])  # as DeepSpeed makes its groups: no timeout=
    out = {}
    if rank == 1:
        time.sleep(8)  # rank 0's collectives must each give up after about 3 s
        return out
    for name, group in (("dp", ps.dp_group), ("later", later)):
        t0 = time.time()
        try:
            dist.all_reduce(torch.ones(1), group=group)
            out[name] = "completed"
        except RuntimeError as e:
            out[name] = (time.time() - t0, str(e).splitlines()[0])
    return out


def test_groups_honour_dist_timeout():
    """Our DP group and a group made afterwards without timeout= (DeepSpeed's) both give up after dist-timeout-s,
    not torch's 30-minute default."""
    from distributed import run_ranks

    r0 = run_ranks(_groups_worker, world=2, timeout=120)[0]
    for name in ("dp", "later"):
        assert r0[name] != "completed", name
        took, msg = r0[name]
        assert 2.5 < took < 7.5, (name, took, msg)


def test_failure_message_in_one_process_run_blames_no_other_rank(restore_timeouts):
    from neox_l2e.parallel import collective_failure_message, set_collective_timeout

    set_collective_timeout(5)
    line = collective_failure_message(RuntimeError("[gloo] Timed out waiting 5000ms for recv"), rank=0, world_size=1)
    assert line.startswith("[rank 0] a collective failed in a one-process run (dist-timeout-s=5)"), line
    assert "another rank" not in line and "\n" not in line
