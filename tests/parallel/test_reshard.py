"""merge_tp_states / split_tp_state: exact round trips, partitioning per key, vocab padding per TP degree."""

import pytest
import torch
from tp_common import random_full_state, tiny_cfg

from neox_l2e.checkpoint.tp_states import merge_tp_states, partition_dims, split_tp_state
from neox_l2e.model import GPTNeoX
from neox_l2e.parallel import ParallelState


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_split_merge_round_trip_is_exact(tp):
    cfg = tiny_cfg()
    full = random_full_state(cfg)
    parts = split_tp_state(full, cfg, tp)
    assert len(parts) == tp
    # each part loads strictly into that rank's TP model (shapes and keys agree)
    for r, sd in enumerate(parts):
        model = GPTNeoX(cfg, ParallelState.layout(tp, r, device="cpu"), init=False)
        model.load_state_dict(sd, strict=True)
    merged = merge_tp_states(parts, cfg)
    assert set(merged) == set(full)
    for k in full:
        assert torch.equal(merged[k], full[k]), k


def test_partitioning_per_key():
    cfg = tiny_cfg()
    dims = partition_dims(cfg, 2, list(random_full_state(cfg)))
    assert dims["gpt_neox.embed_in.weight"] == 0
    assert dims["embed_out.weight"] == 0
    assert dims["gpt_neox.layers.0.attention.query_key_value.weight"] == 0
    assert dims["gpt_neox.layers.0.attention.query_key_value.bias"] == 0
    assert dims["gpt_neox.layers.0.attention.dense.weight"] == 1
    assert dims["gpt_neox.layers.0.attention.dense.bias"] is None  # row-parallel bias: replicated
    assert dims["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"] == 0
    assert dims["gpt_neox.layers.0.mlp.dense_4h_to_h.weight"] == 1
    assert dims["gpt_neox.layers.0.mlp.dense_4h_to_h.bias"] is None
    assert dims["gpt_neox.layers.0.input_layernorm.weight"] is None


def test_vocab_padding_follows_tp_degree():
    cfg = tiny_cfg()  # vocab 100, divisible-by 8: 104 rows at TP=1, 112 at TP=2
    full = random_full_state(cfg)
    assert full["embed_out.weight"].shape[0] == 104
    parts = split_tp_state(full, cfg, 2)
    assert [p["embed_out.weight"].shape[0] for p in parts] == [56, 56]
    assert parts[1]["embed_out.weight"][48:].abs().sum() == 0  # the 8 extra TP padding rows are zero
    assert torch.equal(parts[1]["embed_out.weight"][:48], full["embed_out.weight"][56:])
    # unknown vocab size (tokenizer-provided): inferred from the non-zero rows
    merged = merge_tp_states(parts, cfg.replace(vocab_size=None), vocab_size=None)
    assert torch.equal(merged["embed_out.weight"], full["embed_out.weight"])


def test_l2e_statistics_split_by_neuron_and_tau_replicated():
    cfg = tiny_cfg()
    full = random_full_state(cfg)
    n = cfg.ffn_size
    pre = "gpt_neox.layers.1.mlp.inhibitor."
    full.update(
        {
            pre + "count": torch.arange(n, dtype=torch.float32),
            pre + "mean": torch.randn(n),
            pre + "m2": torch.rand(n),
            pre + "tau": torch.tensor(3.5),
        }
    )
    parts = split_tp_state(full, cfg, 2)
    assert torch.equal(parts[1][pre + "count"], torch.arange(n // 2, n, dtype=torch.float32))
    assert parts[0][pre + "tau"].item() == parts[1][pre + "tau"].item() == 3.5
    merged = merge_tp_states(parts, cfg)
    for k in (pre + "count", pre + "mean", pre + "m2", pre + "tau"):
        assert torch.equal(merged[k], full[k])


def test_merge_refuses_mismatched_ranks_and_warns_on_diverged_replicas():
    cfg = tiny_cfg()
    parts = split_tp_state(random_full_state(cfg), cfg, 2)
    bad = dict(parts[1])
    bad.pop("embed_out.weight")
    with pytest.raises(ValueError, match="different keys"):
        merge_tp_states([parts[0], bad], cfg)
    parts[1]["gpt_neox.final_layer_norm.weight"] = parts[1]["gpt_neox.final_layer_norm.weight"] + 1
    with pytest.warns(UserWarning, match="replicated tensor differs"):
        merge_tp_states(parts, cfg)


def test_tp_model_from_same_seed_is_the_same_model():
    """init draws full tensors from one generator (TP padding rows zero), so TP=2 shards merge to the TP=1 init."""
    cfg = tiny_cfg()
    ref = GPTNeoX(cfg, ParallelState.single()).state_dict()
    parts = [GPTNeoX(cfg, ParallelState.layout(2, r, device="cpu")).state_dict() for r in range(2)]
    merged = merge_tp_states(parts, cfg)
    for k in ref:
        assert torch.equal(merged[k], ref[k]), k


def test_cli_reports_bad_input_in_one_line(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parents[2] / "tools" / "reshard_checkpoint.py"
    r = subprocess.run(
        [sys.executable, str(tool), str(tmp_path / "nothing"), str(tmp_path / "out"), "--tp", "2"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert (
        r.stderr.strip().startswith("error:")
        and "no checkpoint" in r.stderr
        and len(r.stderr.strip().splitlines()) == 1
    )


def _adam_after_one_step(cfg, full, grads, ps):
    from neox_l2e.model.param_groups import param_groups

    model = GPTNeoX(cfg, ps, init=False)
    model.load_state_dict(split_tp_state(full, cfg, ps.tp)[ps.tp_rank])
    g = split_tp_state(grads, cfg, ps.tp)[ps.tp_rank]
    opt = torch.optim.AdamW(param_groups(model, cfg.optimizer.weight_decay), lr=0.01)
    for n, p in model.named_parameters():
        p.grad = g[n].clone()
    opt.step()
    return model.state_dict(), opt.state_dict()


def test_zero0_optimizer_state_is_resharded(tmp_path):
    """ZeRO 0 (fp32): the torch AdamW state inside the model states follows the parameters to the new TP degree."""
    from neox_l2e.checkpoint.reshard import reshard_checkpoint

    cfg = tiny_cfg(model_parallel_size=2)
    full = random_full_state(cfg)
    gen = torch.Generator().manual_seed(3)
    grads = {k: torch.randn(v.shape, generator=gen) for k, v in full.items() if ".inhibitor." not in k}
    grads["embed_out.weight"][100:] = 0  # rows past the vocabulary get no gradient
    grads["gpt_neox.embed_in.weight"][100:] = 0
    src = tmp_path / "src" / "global_step1"
    src.mkdir(parents=True)
    for r in range(2):
        module, opt = _adam_after_one_step(cfg, full, grads, ParallelState.layout(2, r, device="cpu"))
        torch.save(
            {
                "module": module,
                "optimizer": opt,
                "neox_config": cfg.to_dict(),
                "dp_world_size": 1,
                "mp_world_size": 2,
                "iteration": 1,
                "global_steps": 1,
                "skipped_steps": 0,
                "param_shapes": None,
            },
            src / f"mp_rank_{r:02d}_model_states.pt",
        )
    (tmp_path / "src" / "latest").write_text("global_step1")
    rep = reshard_checkpoint(tmp_path / "src", tmp_path / "dst", tp=1)
    assert rep["optimizer"] == "carried" and rep["to"] == (1, 1)
    out = torch.load(tmp_path / "dst" / "global_step1" / "mp_rank_00_model_states.pt", weights_only=False)
    ref_module, ref_opt = _adam_after_one_step(cfg.replace(model_parallel_size=1), full, grads, ParallelState.single())
    assert out["module"].keys() == ref_module.keys()
    for k in ref_module:
        assert torch.equal(out["module"][k], ref_module[k]), k
    assert out["optimizer"]["param_groups"] == ref_opt["param_groups"]
    assert out["optimizer"]["state"].keys() == ref_opt["state"].keys()
    for i, st in ref_opt["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(out["optimizer"]["state"][i][key], st[key]), (i, key)
    assert out["mp_world_size"] == 1 and out["neox_config"]["model_parallel_size"] == 1
    # the output has a manifest; the source may not be the output, hold it or sit inside it; a corrupted
    # source file is refused before anything is written
    from neox_l2e.checkpoint import CheckpointError, ReshardError, verify_manifest

    assert verify_manifest(tmp_path / "dst" / "global_step1") == ["mp_rank_00_model_states.pt"]
    for bad in (tmp_path / "dst", tmp_path / "dst" / "x", tmp_path):
        with pytest.raises(ReshardError, match="is the source .* inside it, or holds it"):
            reshard_checkpoint(tmp_path / "dst", bad, tp=2)
    path = tmp_path / "dst" / "global_step1" / "mp_rank_00_model_states.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states\.pt: corrupted"):
        reshard_checkpoint(tmp_path / "dst", tmp_path / "again", tp=2)
    assert not (tmp_path / "again").exists()


def test_parallel_imports_no_package_above_it():
    """parallel/ is a leaf: neither model/, training/, config/ nor checkpoint/ (the TP merge / split moved to
    neox_l2e/checkpoint/tp_states.py)."""
    import subprocess
    import sys

    code = (
        "import sys, neox_l2e.parallel; print(sorted(m for m in sys.modules if m.startswith('neox_l2e.') "
        "and not m.startswith(('neox_l2e.parallel', 'neox_l2e.errors'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
