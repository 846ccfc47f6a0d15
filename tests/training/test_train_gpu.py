"""GPU smoke tests (skipped on machines without CUDA, see tests/conftest.py): the Trainer on a tiny config on
cuda over NCCL, one rank with L2E (the Triton kernel), and TP=2 on two GPUs. Each run is a fresh process (a
process group is per process)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed import clean_env, free_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
STEPS = 12

# one rank: train the tiny config (configs/local/tiny.yml) on the learnable synthetic dataset
WORKER = r"""
import json, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import torch.distributed as dist
from train_common import datasets, tiny_cfg
from neox_l2e.training.loop import Trainer
tr = Trainer(tiny_cfg(**json.loads(sys.argv[3])), datasets=datasets(), quiet=True)
res = tr.train()
out = dict(backend=dist.get_backend(), device=str(tr.ps.device), rank=tr.ps.rank, world=tr.ps.world_size,
           tp=tr.ps.tp, param_devices=sorted({str(p.device) for p in tr.module.parameters()}),
           losses=[l for _, l in res.train_losses], skipped=res.skipped_steps, l2e=res.l2e_metrics,
           triton=all(i.backend.name == "triton" for i in tr.module.inhibitors()))   # the fused op, not torch
print("RESULT " + json.dumps(out), flush=True)
"""


def _env(**extra) -> dict:
    return clean_env(**{"NEOX_L2E_DS_SHM": "0", "PYTHONUNBUFFERED": "1", **extra})


def _run(world: int, overrides: dict) -> list:
    port = free_port()
    procs = []
    for rank in range(world):
        extra = (
            dict(RANK=rank, WORLD_SIZE=world, LOCAL_RANK=rank, MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
            if world > 1
            else {}
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", WORKER, str(HERE), str(REPO), json.dumps(overrides)],
                env=_env(**extra),
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=300)
            lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
            assert p.returncode == 0 and lines, err[-3000:]
            results.append(json.loads(lines[-1][len("RESULT ") :]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return results


def _check(r: dict, world: int, tp: int) -> None:
    assert r["backend"] == "nccl" and r["device"].startswith("cuda"), r
    assert r["param_devices"] == [f"cuda:{r['rank']}"], r
    assert r["world"] == world and r["tp"] == tp, r
    losses = r["losses"]
    assert len(losses) == STEPS and all(l == l for l in losses) and r["skipped"] == 0, r
    assert losses[-1] < losses[0] - 0.3, losses


@pytest.mark.gpu
def test_tiny_trains_on_one_gpu_over_nccl():
    """With L2E on (backend auto: the Triton kernel on CUDA), inhibiting from the 8th sample on."""
    (r,) = _run(1, dict(train_iters=STEPS, lr_decay_iters=STEPS, l2e_enabled=True, l2e_min_samples=8))
    _check(r, world=1, tp=1)
    assert r["triton"], r
    assert r["l2e"] and all(m["frac_selected"] > 0 for m in r["l2e"].values()), r["l2e"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_tiny_trains_with_tp2_on_two_gpus():
    rs = _run(2, dict(train_iters=STEPS, lr_decay_iters=STEPS, model_parallel_size=2, zero_optimization={"stage": 1}))
    for r in rs:
        _check(r, world=2, tp=2)
    assert rs[0]["losses"] == rs[1]["losses"]  # the loss is reduced over the TP group
