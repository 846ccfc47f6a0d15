"""tools/convert_hf.py against transformers' GPTNeoXForCausalLM (the reference) both ways; its folder safety."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from neox_l2e.checkpoint import load_weights_into, read_model_states, write_weights_checkpoint
from neox_l2e.checkpoint.tp_states import split_tp_state
from neox_l2e.config import build_config
from neox_l2e.errors import InteropError
from neox_l2e.model import GPTNeoX

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import convert_hf  # noqa: E402

VOCAB = 96


def hf_model(tmp_path, tanh=False, parallel_residual=True):
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=64,
        rotary_pct=0.25,
        hidden_act="gelu_pytorch_tanh" if tanh else "gelu",
        use_parallel_residual=parallel_residual,
        tie_word_embeddings=False,
    )
    model = GPTNeoXForCausalLM(cfg).eval()
    with torch.no_grad():  # biases and norms away from 0/1 so a dropped or swapped tensor shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"


def our_cfg(tp=1, tanh=False, parallel_residual=True):
    return build_config(
        dict(
            num_layers=2,
            hidden_size=64,
            num_attention_heads=4,
            seq_length=32,
            vocab_size=VOCAB,
            intermediate_size=256,
            max_position_embeddings=64,
            rotary_pct=0.25,
            make_vocab_size_divisible_by=8,
            bias_gelu_fusion=tanh,
            gpt_j_residual=parallel_residual,
            no_weight_tying=True,
            model_parallel_size=tp,
        )
    )


COMBOS = [(False, True), (False, False), (True, True), (True, False)]  # GELU erf/tanh x parallel/sequential


@pytest.mark.parametrize("tanh,parallel_residual", COMBOS)
def test_import_gives_the_hf_logits(tmp_path, tanh, parallel_residual):
    hf, hf_dir = hf_model(tmp_path, tanh, parallel_residual)
    out = convert_hf.import_hf(hf_dir, tmp_path / "ckpt")
    cfg_dict, states, client = read_model_states(out)
    assert client["weights_only"] and len(states) == 1
    # what train.py does with `load: OUT` and `finetune: true`: a fresh model, then load_weights_into
    cfg = our_cfg(tanh=tanh, parallel_residual=parallel_residual)
    model = GPTNeoX(cfg).eval()
    load_weights_into(model, out)
    tokens = torch.randint(0, VOCAB, (2, 32))
    with torch.no_grad():
        diff = (model(tokens).logits - hf(tokens).logits).abs().max().item()
    assert diff <= 1e-4
    assert "bias-gelu-fusion: " + ("true" if tanh else "false") in (out / "model.yml").read_text()


@pytest.mark.parametrize("tanh,parallel_residual", COMBOS)
def test_export_merges_tp_shards(tmp_path, tanh, parallel_residual):
    cfg1 = our_cfg(tanh=tanh, parallel_residual=parallel_residual)
    torch.manual_seed(3)
    model = GPTNeoX(cfg1).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    cfg2 = our_cfg(tp=2, tanh=tanh, parallel_residual=parallel_residual)
    shards = split_tp_state(model.state_dict(), cfg2, 2)
    write_weights_checkpoint(tmp_path / "run", cfg2, shards, tag="global_step7")
    out = convert_hf.export_hf(tmp_path / "run", tmp_path / "hf")
    hf = GPTNeoXForCausalLM.from_pretrained(out).eval()
    tokens = torch.randint(0, VOCAB, (2, 32))
    with torch.no_grad():
        diff = (model(tokens).logits - hf(tokens).logits[..., : model.vocab_size]).abs().max().item()
    assert diff <= 1e-4
    assert hf.config.num_hidden_layers == 2 and hf.config.use_parallel_residual == parallel_residual
    assert hf.config.hidden_act == ("gelu_pytorch_tanh" if tanh else "gelu")


def test_round_trip_hf_to_ours_to_hf(tmp_path):
    hf, hf_dir = hf_model(tmp_path)
    convert_hf.import_hf(hf_dir, tmp_path / "ckpt")
    out = convert_hf.export_hf(tmp_path / "ckpt", tmp_path / "hf2", dtype=torch.bfloat16)
    back = GPTNeoXForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    for (k, a), (k2, b) in zip(sorted(hf.state_dict().items()), sorted(back.state_dict().items())):
        assert k == k2 and torch.equal(a.to(torch.bfloat16).float(), b), k


def test_cli_errors_are_one_line(tmp_path):
    def run(*args):
        return subprocess.run(
            [sys.executable, str(ROOT / "tools" / "convert_hf.py"), *map(str, args)],
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )

    r = run("import", tmp_path / "nowhere", tmp_path / "out")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "not a directory" in r.stderr
    r = run("export", tmp_path, tmp_path / "out")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "no checkpoint" in r.stderr
    _, hf_dir = hf_model(tmp_path)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep me")
    r = run("import", hf_dir, tmp_path / "busy")
    assert r.returncode == 2 and "--overwrite" in r.stderr and (tmp_path / "busy" / "x").read_text() == "keep me"
    r = run("import", hf_dir, tmp_path / "ok")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "ok" / "latest").read_text().strip() == "global_step0"


@pytest.mark.parametrize(
    "config_json,message",
    [
        ("[1, 2]", "expected a JSON object"),
        (
            '{"model_type": "gpt_neox", "vocab_size": "abc", "hidden_size": 64, "num_hidden_layers": 2, '
            '"num_attention_heads": 4}',
            "'vocab_size' is 'abc'; it must be a positive whole number",
        ),
        ('{"model_type": "llama"}', "expected 'gpt_neox'"),
        (
            '{"model_type": "gpt_neox", "vocab_size": 96, "hidden_size": 64, "num_hidden_layers": 2, '
            '"num_attention_heads": 4, "rope_parameters": "default"}',
            "'rope_parameters' is str 'default', expected an object",
        ),
        (
            '{"model_type": "gpt_neox", "vocab_size": 96, "hidden_size": Infinity, "num_hidden_layers": 2, '
            '"num_attention_heads": 4}',
            "'hidden_size' is inf; it must be a positive whole number",
        ),
        (
            '{"model_type": "gpt_neox", "vocab_size": -5, "hidden_size": 64, "num_hidden_layers": 2, '
            '"num_attention_heads": 4}',
            "'vocab_size' is -5; it must be a positive whole number",
        ),
    ],
)
def test_bad_config_json_is_one_line(tmp_path, capsys, config_json, message):
    """Through the tool's main (the entry point itself runs as a process in test_cli_errors_are_one_line)."""
    _, hf_dir = hf_model(tmp_path)
    (hf_dir / "config.json").write_text(config_json)
    capsys.readouterr()
    assert convert_hf.main(["import", str(hf_dir), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.strip().count("\n") == 0, err
    assert not (tmp_path / "out").exists()


def _tp2_train_worker(rank, world, save):
    sys.path.insert(0, str(ROOT / "tests" / "training"))
    from train_common import datasets, tiny_cfg

    from neox_l2e.training.loop import Trainer

    tr = Trainer(
        tiny_cfg(
            model_parallel_size=2,
            zero_optimization={"stage": 1},
            train_iters=2,
            save=save,
            l2e_enabled=True,
            l2e_min_samples=8,
        ),
        datasets=datasets(),
        quiet=True,
    )
    tr.train()
    model = tr.module.eval()
    tokens = torch.arange(32).reshape(2, 16) % 64
    with torch.no_grad():
        logits = model.full_logits(model(tokens).logits)
    return logits.numpy()


def test_export_of_a_deepspeed_tp2_checkpoint(tmp_path):
    """A TP=2 run saved by DeepSpeed (ZeRO-1, L2E on) -> export -> transformers' logits equal the run's own."""
    sys.path.insert(0, str(ROOT / "tests"))
    from distributed import run_ranks

    logits = run_ranks(_tp2_train_worker, world=2, args=(str(tmp_path / "run"),))[0]
    out = convert_hf.export_hf(tmp_path / "run", tmp_path / "hf")
    hf = GPTNeoXForCausalLM.from_pretrained(out).eval()
    tokens = torch.arange(32).reshape(2, 16) % 64
    with torch.no_grad():
        theirs = hf(tokens).logits[..., : logits.shape[-1]]
    assert (theirs - torch.from_numpy(logits)).abs().max().item() <= 1e-4


def _tiny_checkpoint(path):
    cfg = our_cfg()
    torch.manual_seed(5)
    write_weights_checkpoint(path, cfg, [GPTNeoX(cfg).state_dict()], tag="global_step3")
    return path


def _cli(capsys, *args):
    """tools/convert_hf.py's main in this process: (exit status, stderr)."""
    code = convert_hf.main([str(a) for a in args])
    return code, capsys.readouterr().err


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def test_export_overwrite_never_removes_the_checkpoint_nor_other_files(tmp_path, capsys):
    """--overwrite with OUT the checkpoint folder, inside it or holding it: refused in one line, nothing removed
    (it deleted the checkpoint and an unrelated file); OUT a file: one line."""
    run = tmp_path / "runs" / "a"
    _tiny_checkpoint(run / "checkpoints")
    (run / "notes.txt").write_text("mine")
    before = _snapshot(tmp_path)
    for out in (run / "checkpoints", run / "checkpoints" / "hf", run, tmp_path / "runs"):
        code, err = _cli(capsys, "export", run / "checkpoints", out, "--overwrite")
        assert code == 2 and err.strip().count("\n") == 0 and "is the source" in err, err
        assert _snapshot(tmp_path) == before
    (tmp_path / "afile").write_text("x")
    code, err = _cli(capsys, "export", run / "checkpoints", tmp_path / "afile", "--overwrite")
    assert code == 2 and "exists and is a file" in err and err.strip().count("\n") == 0, err
    assert (tmp_path / "afile").read_text() == "x"


def test_export_overwrite_replaces_only_a_previous_export(tmp_path):
    """--overwrite replaces an earlier export (temp sibling, then a swap) but refuses a folder holding files an
    export did not write; the export gets the user's umask (not mkdtemp's 0700)."""
    ckpt = _tiny_checkpoint(tmp_path / "ck")
    out = tmp_path / "hf"
    old = os.umask(0o022)
    try:
        convert_hf.export_hf(ckpt, out)
        assert (out / "model.safetensors").is_file() and (os.stat(out).st_mode & 0o777) == 0o755
        first = (out / "model.safetensors").read_bytes()
        convert_hf.export_hf(ckpt, out, dtype=torch.bfloat16, overwrite=True)
        assert (out / "model.safetensors").read_bytes() != first
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp / old folder left
        (out / "mine.txt").write_text("keep")
        with pytest.raises(InteropError, match=r"hf: --overwrite replaces only a previous export.*mine\.txt"):
            convert_hf.export_hf(ckpt, out, overwrite=True)
        assert (out / "mine.txt").read_text() == "keep" and (out / "model.safetensors").is_file()
    finally:
        os.umask(old)


def test_export_falls_back_to_copy_across_filesystems(tmp_path, monkeypatch):
    """A rename that crosses filesystems (EXDEV) is replaced by a copy into OUT."""
    import errno

    from neox_l2e.interop import hf as hf_mod

    ckpt = _tiny_checkpoint(tmp_path / "ck")
    convert_hf.export_hf(ckpt, tmp_path / "hf")
    real = os.replace

    def cross_device(a, b):
        if Path(a).is_dir():
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(a, b)

    monkeypatch.setattr(hf_mod.os, "replace", cross_device)
    out = convert_hf.export_hf(ckpt, tmp_path / "hf", dtype=torch.float16, overwrite=True)
    assert GPTNeoXForCausalLM.from_pretrained(out).config.num_hidden_layers == 2
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
