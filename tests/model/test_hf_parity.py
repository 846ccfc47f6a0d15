"""Our model against transformers' GPTNeoXForCausalLM on the same random weights (the reference)."""

import json

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from neox_l2e.config import build_config
from neox_l2e.interop.hf import InteropError, hf_config_from_neox, load_hf_into_model, read_hf_dir, write_hf_dir
from neox_l2e.model import GPTNeoX


def tiny_cfg(parallel_residual=True, tanh=True, **extra):
    keys = dict(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        seq_length=32,
        vocab_size=100,
        rotary_pct=0.25,
        gpt_j_residual=parallel_residual,
        bias_gelu_fusion=tanh,
        no_weight_tying=True,
        make_vocab_size_divisible_by=8,
        init_method="small_init",
        output_layer_init_method="wang_init",
    )
    keys.update(extra)
    return build_config(keys)


def randomised(cfg, seed=0):
    """Our model with every parameter (biases, norms too) perturbed, so nothing is trivially zero or one."""
    torch.manual_seed(seed)
    model = GPTNeoX(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def hf_twin(model, cfg, **hf_overrides):
    """transformers' model with our weights (transformers >= 5 calls the output head lm_head)."""
    hf_cfg = GPTNeoXConfig(**{**hf_config_from_neox(cfg, model.vocab_size), **hf_overrides})
    hf = GPTNeoXForCausalLM(hf_cfg).eval()
    head = "lm_head.weight" if "lm_head.weight" in hf.state_dict() else "embed_out.weight"
    state = {
        (head if k == "embed_out.weight" else k): v for k, v in model.state_dict().items() if ".inhibitor." not in k
    }
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if k.endswith((".weight", ".bias")) and k != head], missing
    return hf


@pytest.mark.parametrize("parallel_residual", [True, False])
@pytest.mark.parametrize("tanh", [True, False])
def test_logits_match_transformers(parallel_residual, tanh):
    cfg = tiny_cfg(parallel_residual, tanh)
    model = randomised(cfg)
    hf = hf_twin(model, cfg)
    tokens = torch.randint(0, 100, (3, 32))
    with torch.no_grad():
        ours, theirs = model(tokens).logits, hf(tokens).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert hf.config.hidden_act == ("gelu_pytorch_tanh" if tanh else "gelu")


def test_gelu_choice_matters():
    """The parity test can fail: the other GELU gives visibly different logits."""
    cfg = tiny_cfg(tanh=True)
    model = randomised(cfg)
    hf = hf_twin(model, cfg, hidden_act="gelu")
    tokens = torch.randint(0, 100, (2, 32))
    with torch.no_grad():
        assert (model(tokens).logits - hf(tokens).logits).abs().max().item() > 1e-4


@pytest.mark.parametrize("parallel_residual", [True, False])
def test_export_and_import_round_trip(tmp_path, parallel_residual):
    cfg = tiny_cfg(parallel_residual, tanh=False)
    model = randomised(cfg, seed=1)
    out = write_hf_dir(tmp_path / "hf", cfg, model.state_dict(), model.vocab_size)
    hf = GPTNeoXForCausalLM.from_pretrained(out).eval()
    back, cfg2 = load_hf_into_model(out)
    tokens = torch.randint(0, 100, (2, 32))
    with torch.no_grad():
        a, b, c = model(tokens).logits, hf(tokens).logits, back.eval()(tokens).logits
    assert (a - b).abs().max().item() <= 1e-4 and torch.equal(a, c)
    assert cfg2.model.gpt_j_residual == parallel_residual and cfg2.gelu_approximate == "none"


def test_write_refuses_non_empty_dir(tmp_path):
    cfg = tiny_cfg()
    model = randomised(cfg)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("x")
    with pytest.raises(InteropError, match="exists and is not empty"):
        write_hf_dir(tmp_path / "hf", cfg, model.state_dict(), model.vocab_size)


def test_bad_hf_dirs(tmp_path):
    with pytest.raises(InteropError, match="not a directory"):
        read_hf_dir(tmp_path / "nope")
    d = tmp_path / "d"
    d.mkdir()
    with pytest.raises(InteropError, match="no config.json"):
        read_hf_dir(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(InteropError, match=r"config.json: not valid JSON"):
        read_hf_dir(d)
    cfg = tiny_cfg()
    (d / "config.json").write_text(json.dumps(hf_config_from_neox(cfg, 104)))
    with pytest.raises(InteropError, match="no weights found"):
        read_hf_dir(d)
    (d / "model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(InteropError, match=r"model.safetensors: cannot read weights"):
        read_hf_dir(d)


def test_incomplete_and_mismatched_weights(tmp_path):
    cfg = tiny_cfg()
    model = randomised(cfg)
    out = write_hf_dir(tmp_path / "hf", cfg, model.state_dict(), model.vocab_size)
    from safetensors.torch import load_file, save_file

    state = load_file(str(out / "model.safetensors"))
    del state["gpt_neox.layers.1.mlp.dense_4h_to_h.weight"]
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(InteropError, match=r"weight 'gpt_neox.layers.1.mlp.dense_4h_to_h.weight' is missing"):
        load_hf_into_model(out)
    hf = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**hf, "model_type": "llama"}))
    with pytest.raises(InteropError, match="model_type is 'llama'"):
        load_hf_into_model(out)


def test_pickle_weights_are_loaded_without_code(tmp_path):
    """pytorch_model.bin is read with weights_only=True: a pickle that would run code is refused."""
    cfg = tiny_cfg()
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(hf_config_from_neox(cfg, 104)))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, d / "pytorch_model.bin")
    with pytest.raises(InteropError, match="cannot read weights"):
        read_hf_dir(d)


def test_sdpa_attention_is_causal():
    cfg = tiny_cfg()
    model = randomised(cfg)
    tokens = torch.randint(0, 100, (1, 16))
    changed = tokens.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 100
    with torch.no_grad():
        a, b = model(tokens).logits, model(changed).logits
    assert torch.equal(a[:, :10], b[:, :10]) and not torch.equal(a[:, 10:], b[:, 10:])


def test_tied_embeddings_and_checkpointing_match_plain():
    cfg = tiny_cfg(no_weight_tying=False)
    model = randomised(cfg)
    assert not hasattr(model, "embed_out")
    hf = hf_twin(model, cfg)
    tokens = torch.randint(0, 100, (2, 32))
    with torch.no_grad():
        assert (model(tokens).logits - hf(tokens).logits).abs().max().item() <= 1e-4
    # activation checkpointing changes memory, not results
    cfg_ckpt = tiny_cfg(checkpoint_activations=True)
    plain, ckpt = randomised(tiny_cfg(), seed=3).train(), randomised(cfg_ckpt, seed=3).train()
    la = plain.lm_loss(plain(tokens).logits, tokens)
    lb = ckpt.lm_loss(ckpt(tokens).logits, tokens)
    la.backward()
    lb.backward()
    assert torch.equal(la, lb)
    for (n, p), (_, q) in zip(plain.named_parameters(), ckpt.named_parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), n
