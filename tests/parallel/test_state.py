"""ParallelState and the configuration's parallel checks (single process)."""
import pytest
import torch

from neox_l2e.config import ConfigError
from neox_l2e.model import GPTNeoX
from neox_l2e.parallel import ParallelState
from neox_l2e.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from tp_common import tiny_cfg


def test_zero3_with_tp_is_refused_at_load():
    with pytest.raises(ConfigError, match=r"ZeRO stage 3 with model-parallel-size 2 is not supported"):
        tiny_cfg(model_parallel_size=2, zero_optimization={"stage": 3})
    for stage in (0, 1, 2):                      # ZeRO 1 and 2 combine with TP (NeoX itself allows only 1)
        assert tiny_cfg(model_parallel_size=2, zero_optimization={"stage": stage}).zero_stage == stage
    assert tiny_cfg(zero_optimization={"stage": 3}).zero_stage == 3        # ZeRO-3 alone is fine


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


def test_single_process_state_and_no_op_collectives():
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
