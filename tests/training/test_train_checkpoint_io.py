"""The checkpoint format contract: readers, the weights-only writer (finetune start), TP shards, pruning, and
which layout changes a resume accepts."""

import torch
from distributed import clean_env, run_ranks

from neox_l2e.checkpoint import (
    latest_tag,
    list_tags,
    prune_checkpoints,
    read_model_states,
    write_latest,
    write_weights_checkpoint,
)


def _finetune_worker(rank, world, src):
    from train_common import datasets, tiny_cfg

    from neox_l2e.training.loop import Trainer

    tr = Trainer(tiny_cfg(load=src, finetune=True, train_iters=2), datasets=datasets(), quiet=True)
    start = {k: v.detach().numpy().copy() for k, v in tr.module.state_dict().items()}  # numpy: pickled by value
    res = tr.train()
    return {"start": start, "iteration": res.iteration, "start_iteration": res.start_iteration}


def _tp_worker(rank, world, save):
    from train_common import datasets, tiny_cfg

    from neox_l2e.training.loop import Trainer

    tr = Trainer(
        tiny_cfg(model_parallel_size=2, zero_optimization={"stage": 1}, train_iters=3, save=save),
        datasets=datasets(),
        quiet=True,
    )
    res = tr.train()
    return {
        "losses": [l for _, l in res.train_losses],
        "tp_rank": tr.ps.tp_rank,
        "state": {k: v.detach().numpy().copy() for k, v in tr.module.state_dict().items()},
    }


def test_weights_checkpoint_round_trip_and_finetune(tmp_path):
    from train_common import tiny_cfg

    from neox_l2e.model import GPTNeoX

    cfg = tiny_cfg(seed=999)
    state = GPTNeoX(cfg, seed=cfg.training.seed).state_dict()
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
    # the manifest (hashed by both ranks) lists every file of the folder, and they match it
    from neox_l2e.checkpoint import verify_manifest

    files = sorted(p.name for p in (save / "global_step3").iterdir() if p.name != "manifest.json")
    assert len(files) == 6 and verify_manifest(save / "global_step3") == files
    # train.py resuming it as TP=1 (one process) without resharding: one line, exit 2, before any model is built
    import subprocess
    import sys

    from train_common import REPO

    p = subprocess.run(
        [sys.executable, str(REPO / "train.py"), str(REPO / "configs/local/tiny.yml"), f"load={save}"],
        env=clean_env(NEOX_L2E_DS_SHM="0"),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    lines = [l for l in p.stderr.splitlines() if l.strip() and "[WARNING]" not in l]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert f"{save}/global_step3: saved as TP=2 x DP=1, this run is TP=1 x DP=1" in lines[0]
    assert f"tools/reshard_checkpoint.py {save} OUT --tp 1 --dp 1" in lines[0]


def _fake_checkpoint(d, tp, dp, zero_files=(), tag="global_step5", stage=None):
    """A checkpoint folder as save_checkpoint lays it out, with tiny files (only the layout matters here);
    stage: the saved config's ZeRO stage (None: no saved config, the stage is read from the files)."""
    folder = d / tag
    folder.mkdir(parents=True)
    for r in range(tp):
        sd = {"module": {}, "tp": tp, "dp": dp, "iteration": 5}
        if stage is not None:
            sd["neox_config"] = {"zero_optimization": {"stage": stage}}
        torch.save(sd, folder / f"mp_rank_{r:02d}_model_states.pt")
    for name in zero_files:
        torch.save({}, folder / name)
    write_latest(d, tag)
    return d


def test_resume_layout_rules(tmp_path):
    """What DeepSpeed can load across layouts: a TP change never; a DP change with ZeRO 0, and with ZeRO 1/2
    without the optimizer state; never with ZeRO-3; a ZeRO stage change with the optimizer state only between
    1 and 2 (see check_resume_layout)."""
    from neox_l2e.checkpoint import CheckpointError, check_resume_layout, saved_layout

    shards = [f"zero_pp_rank_{d}_mp_rank_00_optim_states.pt" for d in range(2)]
    z0 = _fake_checkpoint(tmp_path / "z0", tp=1, dp=2)
    z1 = _fake_checkpoint(tmp_path / "z1", tp=1, dp=2, zero_files=shards)
    z3 = _fake_checkpoint(
        tmp_path / "z3",
        tp=1,
        dp=2,
        zero_files=shards + [f"zero_pp_rank_{d}_mp_rank_00_model_states.pt" for d in range(2)],
    )
    tp2 = _fake_checkpoint(tmp_path / "tp2", tp=2, dp=1)
    assert saved_layout(z1 / "global_step5") == (1, 2) and saved_layout(tp2 / "global_step5") == (2, 1)
    check_resume_layout(z0, "global_step5", tp=1, dp=1, zero_stage=0)  # replicated state
    check_resume_layout(z1, "global_step5", tp=1, dp=1, zero_stage=1, load_optimizer=False)  # master from weights
    check_resume_layout(z1, "global_step5", tp=1, dp=2, zero_stage=1)  # same layout
    check_resume_layout(tp2, "global_step5", tp=2, dp=4, zero_stage=0)
    check_resume_layout(tp2, "global_step5", tp=2, dp=1, zero_stage=0, weights_only=True)
    refused = [
        (z1, dict(tp=1, dp=1, zero_stage=2), "ZeRO-2 partitions the optimizer state by DP rank"),
        (z3, dict(tp=1, dp=1, zero_stage=3, load_optimizer=False), "ZeRO-3 cannot change the DP size"),
        (tp2, dict(tp=1, dp=2, zero_stage=0), "saved as TP=2 x DP=1, this run is TP=1 x DP=2"),
        (tp2, dict(tp=1, dp=1, zero_stage=0, weights_only=True), "saved with TP=2, this run has TP=1"),
    ]
    # the saved ZeRO stage (saved config): the optimizer state loads only into the same stage (or 1 <-> 2)
    s1 = _fake_checkpoint(tmp_path / "s1", tp=1, dp=2, stage=1)
    s0 = _fake_checkpoint(tmp_path / "s0", tp=1, dp=2, stage=0)
    check_resume_layout(s1, "global_step5", tp=1, dp=2, zero_stage=2)
    check_resume_layout(s1, "global_step5", tp=1, dp=2, zero_stage=0, load_optimizer=False)
    check_resume_layout(s1, "global_step5", tp=1, dp=1, zero_stage=0, load_optimizer=False)
    check_resume_layout(s0, "global_step5", tp=1, dp=1, zero_stage=1, load_optimizer=False)
    refused += [
        (s1, dict(tp=1, dp=2, zero_stage=0), "saved with ZeRO-1, this run uses ZeRO-0"),
        (s1, dict(tp=1, dp=1, zero_stage=0), "no-load-optim: true"),
        (s0, dict(tp=1, dp=2, zero_stage=1), "resume with ZeRO-0"),
        (s0, dict(tp=1, dp=2, zero_stage=3, load_optimizer=False), "this run uses ZeRO-3, which cannot"),
    ]
    for d, kw, text in refused:
        try:
            check_resume_layout(d, "global_step5", **kw)
        except CheckpointError as e:
            assert text in str(e) and "\n" not in str(e), (kw, str(e))
        else:
            raise AssertionError(f"not refused: {d.name} {kw}")


def _stage_change_worker(rank, world, save):
    from train_common import datasets, tiny_cfg

    from neox_l2e import checkpoint as ckpt
    from neox_l2e.checkpoint import io as ckpt_io
    from neox_l2e.training.loop import Trainer

    Trainer(tiny_cfg(zero_optimization={"stage": 1}, train_iters=2, save=save), datasets=datasets(), quiet=True).train()
    reads = []
    meta = ckpt_io.saved_meta
    ckpt_io.saved_meta = lambda folder: reads.append(folder) or meta(folder)
    try:
        tr = Trainer(
            tiny_cfg(zero_optimization={"stage": 2}, train_iters=3, load=save), datasets=datasets(), quiet=True
        )
        out = {"iteration": tr.iteration, "reads": len(reads)}
        try:
            Trainer(tiny_cfg(train_iters=3, load=save), datasets=datasets(), quiet=True)  # ZeRO 0
            out["error"] = None
        except ckpt.CheckpointError as e:
            out["error"] = str(e)
    finally:
        ckpt_io.saved_meta = meta
    return out


def test_resume_refuses_a_zero_stage_change_with_the_optimizer_state(tmp_path):
    """A ZeRO-1 checkpoint (same DP) resumed with ZeRO 0 and the optimizer state: one CheckpointError line, not
    DeepSpeed's AttributeError; resumed with ZeRO 2 it loads, its layout read once."""
    out = run_ranks(_stage_change_worker, world=1, args=(str(tmp_path / "ck"),))[0]
    assert out["iteration"] == 2 and out["reads"] == 1, out
    assert out["error"] and "saved with ZeRO-1, this run uses ZeRO-0" in out["error"], out
    assert "no-load-optim: true" in out["error"] and "\n" not in out["error"]


def test_prune_and_latest(tmp_path):
    from train_common import tiny_cfg

    cfg = tiny_cfg()
    for step in (1, 2, 3, 4):
        write_weights_checkpoint(tmp_path, cfg, [{"w": torch.tensor([float(step)])}], tag=f"global_step{step}")
    (tmp_path / ".tmp-global_step5").mkdir()
    assert list_tags(tmp_path) == ["global_step1", "global_step2", "global_step3", "global_step4"]
    write_latest(tmp_path, "global_step2")  # latest is never pruned, whatever its age
    assert prune_checkpoints(tmp_path, 1) == ["global_step1", "global_step3"]
    assert list_tags(tmp_path) == ["global_step2", "global_step4"]
    assert not (tmp_path / ".tmp-global_step5").exists()
    assert read_model_states(tmp_path)[1][0]["w"].item() == 2.0
    assert read_model_states(tmp_path, "global_step4")[1][0]["w"].item() == 4.0


def _lambda_worker(rank, world, l2e):
    from train_common import datasets, tiny_cfg

    from neox_l2e.training.loop import Trainer

    tr = Trainer(tiny_cfg(train_iters=8, **l2e), datasets=datasets(), quiet=True)
    res = tr.train()
    return {
        "losses": [l for _, l in res.train_losses],
        "l2e": res.l2e_metrics,
        "state": {k: v.detach().numpy().copy() for k, v in tr.module.state_dict().items() if ".inhibitor." not in k},
    }


def test_lambda_zero_trains_exactly_like_l2e_off():
    """The baseline of tools/l2e_sweep.py: at lambda = 0 the inhibitors select and log but the model's
    losses and weights are bit-identical to a run without L2E; a positive lambda changes them."""
    off, zero, on = (
        run_ranks(_lambda_worker, world=1, args=(kw,))[0]
        for kw in (
            {},
            dict(l2e_enabled=True, l2e_lambda=0.0, l2e_min_samples=8),
            dict(l2e_enabled=True, l2e_lambda=1.0, l2e_min_samples=8),
        )
    )
    assert off["losses"] == zero["losses"] and not off["l2e"]
    assert all((off["state"][k] == zero["state"][k]).all() for k in off["state"])
    assert zero["l2e"] and all(m["frac_selected"] > 0 for m in zero["l2e"].values())
    assert on["losses"] != zero["losses"]
