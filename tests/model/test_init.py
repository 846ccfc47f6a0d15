"""NeoX's init methods, measured on the built model: the standard deviation of every weight family is the
formula's (small_init, wang_init, scaled_normal, normal), biases are 0 and norm weights 1."""

import math

import pytest
import torch

from neox_l2e.config import build_config
from neox_l2e.model import GPTNeoX

L, H = 4, 256
OUTPUT_LAYERS = ("attention.dense.weight", "dense_4h_to_h.weight")


def _cfg(inner, outer, std=0.02):
    return build_config(
        dict(
            num_layers=L,
            hidden_size=H,
            num_attention_heads=4,
            seq_length=16,
            vocab_size=512,
            make_vocab_size_divisible_by=128,
            no_weight_tying=True,
            init_method=inner,
            output_layer_init_method=outer,
            init_method_std=std,
        )
    )


SIGMA = {
    "small_init": math.sqrt(2 / (5 * H)),
    "wang_init": 2 / L / math.sqrt(H),
    "scaled_normal": 0.02 / math.sqrt(2 * L),
    "normal": 0.02,
}


@pytest.mark.parametrize("inner,outer", [("small_init", "wang_init"), ("normal", "scaled_normal")])
def test_weight_stds_follow_the_formulas(inner, outer):
    model = GPTNeoX(_cfg(inner, outer))
    seen = set()
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            assert torch.count_nonzero(p) == 0, name
        elif "layernorm" in name or "layer_norm" in name:
            assert torch.all(p == 1), name
        else:
            want = SIGMA[outer if name.endswith(OUTPUT_LAYERS) else inner]
            rows = p[: model.base_vocab_size] if name.endswith(("embed_in.weight", "embed_out.weight")) else p
            got = rows.float().std().item()
            assert abs(got - want) <= 0.05 * want, (name, got, want)  # >= 65k samples: ~0.3% sampling error
            assert abs(rows.float().mean().item()) <= 0.05 * want, name
            seen.add(outer if name.endswith(OUTPUT_LAYERS) else inner)
    assert seen == {inner, outer}
