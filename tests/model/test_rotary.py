"""Rotary tables under a cast of the model: inv_freq stays fp32, so a bf16 / fp16 model's cos / sin are the
fp32 tables rounded once (a rounded inv_freq is off by up to 0.36 at position 2047, Pythia's last)."""

import pytest
import torch

from neox_l2e.config import build_config
from neox_l2e.model import GPTNeoX


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cast_model_keeps_fp32_rotary_frequencies(dtype):
    # Pythia-410M's head: 64 dims, rotary-pct 0.25 -> 16 rotary dims; seq 2048
    cfg = build_config(
        dict(num_layers=1, hidden_size=256, num_attention_heads=4, seq_length=2048, vocab_size=64, rotary_pct=0.25)
    )
    ref = GPTNeoX(cfg).rotary
    cos32, sin32 = ref(2048, "cpu", torch.float32)
    model = GPTNeoX(cfg).to(dtype)
    assert model.rotary.inv_freq.dtype == torch.float32 and torch.equal(model.rotary.inv_freq, ref.inv_freq)
    assert model.gpt_neox.embed_in.weight.dtype == dtype  # the cast itself happened
    cos, sin = model.rotary(2048, "cpu", dtype)
    assert torch.equal(cos, cos32.to(dtype)) and torch.equal(sin, sin32.to(dtype))
    assert "rotary.inv_freq" not in model.state_dict()  # not a checkpoint key (HF recomputes it too)
    model.to("meta")  # a device move still moves it
    assert model.rotary.inv_freq.device.type == "meta" and model.rotary.inv_freq.dtype == torch.float32
