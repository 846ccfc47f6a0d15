"""The checkpoint format contract: readers, the weights-only writer (finetune start), TP shards, pruning."""
import torch

from distributed import run_ranks
from neox_l2e.training.checkpoint import (latest_tag, list_tags, prune_checkpoints, read_model_states,
                                          write_latest, write_weights_checkpoint)


def _finetune_worker(rank, world, src):
    from neox_l2e.training.loop import Trainer
    from train_common import datasets, tiny_cfg
    tr = Trainer(tiny_cfg(load=src, finetune=True, train_iters=2), datasets=datasets(), quiet=True)
    start = {k: v.detach().numpy().copy() for k, v in tr.module.state_dict().items()}   # numpy: pickled by value
    res = tr.train()
    return {"start": start, "iteration": res.iteration, "start_iteration": res.start_iteration}


def _tp_worker(rank, world, save):
    from neox_l2e.training.loop import Trainer
    from train_common import datasets, tiny_cfg
    tr = Trainer(tiny_cfg(model_parallel_size=2, zero_optimization={"stage": 1}, train_iters=3, save=save),
                 datasets=datasets(), quiet=True)
    res = tr.train()
    return {"losses": [l for _, l in res.train_losses], "tp_rank": tr.ps.tp_rank,
            "state": {k: v.detach().numpy().copy() for k, v in tr.module.state_dict().items()}}


def test_weights_checkpoint_round_trip_and_finetune(tmp_path):
    from neox_l2e.model import GPTNeoX
    from train_common import tiny_cfg
    cfg = tiny_cfg(seed=999)
    state = GPTNeoX(cfg).state_dict()
    d = write_weights_checkpoint(tmp_path / "w", cfg, [state])
    assert d.name == "global_step0" and latest_tag(tmp_path / "w") == "global_step0"
    cfg_dict, states, client = read_model_states(tmp_path / "w")
    assert cfg_dict == cfg.to_dict() and client["iteration"] == 0 and client["consumed_train_samples"] == 0
    assert len(states) == 1 and all(torch.equal(states[0][k], state[k]) for k in state)
    # train.py-style finetune start: the weights are the checkpoint's (not the seed's), step 0
    out = run_ranks(_finetune_worker, world=1, args=(str(tmp_path / "w"),))[0]
    assert all(torch.equal(torch.from_numpy(out["start"][k]), state[k]) for k in state)
    assert out["start_iteration"] == 0 and out["iteration"] == 2


def test_tp2_checkpoint_has_one_model_file_per_tp_rank(tmp_path):
    save = tmp_path / "tp"
    outs = run_ranks(_tp_worker, world=2, args=(str(save),))
    assert outs[0]["losses"] == outs[1]["losses"] and outs[0]["losses"][-1] < outs[0]["losses"][0]
    cfg_dict, states, client = read_model_states(save)
    assert cfg_dict["model_parallel_size"] == 2 and client["iteration"] == 3 and client["tp"] == 2
    assert len(states) == 2
    for out in outs:
        sd = states[out["tp_rank"]]
        assert sd.keys() == out["state"].keys()
        assert all(torch.equal(sd[k], torch.from_numpy(out["state"][k])) for k in sd)
    # column-parallel weights are split, replicated ones equal
    qkv = "gpt_neox.layers.0.attention.query_key_value.weight"
    assert states[0][qkv].shape[0] * 2 == 3 * 32 and not torch.equal(states[0][qkv], states[1][qkv])
    ln = "gpt_neox.layers.0.input_layernorm.weight"
    assert torch.equal(states[0][ln], states[1][ln])


def test_prune_and_latest(tmp_path):
    from train_common import tiny_cfg
    cfg = tiny_cfg()
    for step in (1, 2, 3, 4):
        write_weights_checkpoint(tmp_path, cfg, [{"w": torch.tensor([float(step)])}], tag=f"global_step{step}")
    (tmp_path / ".tmp-global_step5").mkdir()
    assert list_tags(tmp_path) == ["global_step1", "global_step2", "global_step3", "global_step4"]
    write_latest(tmp_path, "global_step2")            # latest is never pruned, whatever its age
    assert prune_checkpoints(tmp_path, 1) == ["global_step1", "global_step3"]
    assert list_tags(tmp_path) == ["global_step2", "global_step4"]
    assert not (tmp_path / ".tmp-global_step5").exists()
    assert read_model_states(tmp_path)[1][0]["w"].item() == 2.0
    assert read_model_states(tmp_path, "global_step4")[1][0]["w"].item() == 4.0


def _lambda_worker(rank, world, l2e):
    from neox_l2e.training.loop import Trainer
    from train_common import datasets, tiny_cfg
    tr = Trainer(tiny_cfg(train_iters=8, **l2e), datasets=datasets(), quiet=True)
    res = tr.train()
    return {"losses": [l for _, l in res.train_losses], "l2e": res.l2e_metrics,
            "state": {k: v.detach().numpy().copy() for k, v in tr.module.state_dict().items()
                      if ".inhibitor." not in k}}


def test_lambda_zero_trains_exactly_like_l2e_off():
    """The baseline of tools/l2e_sweep.py: at lambda = 0 the inhibitors select and log but the model's
    losses and weights are bit-identical to a run without L2E; a positive lambda changes them."""
    off, zero, on = (run_ranks(_lambda_worker, world=1, args=(kw,))[0] for kw in (
        {}, dict(l2e_enabled=True, l2e_lambda=0.0, l2e_min_samples=8),
        dict(l2e_enabled=True, l2e_lambda=1.0, l2e_min_samples=8)))
    assert off["losses"] == zero["losses"] and not off["l2e"]
    assert all((off["state"][k] == zero["state"][k]).all() for k in off["state"])
    assert zero["l2e"] and all(m["frac_selected"] > 0 for m in zero["l2e"].values())
    assert on["losses"] != zero["losses"]
