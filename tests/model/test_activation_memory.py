"""Activation memory without checkpointing: ours saves no more for backward, and holds no more at its peak, than
transformers' GPTNeoXForCausalLM with the same weights on the same batch (counted by tools/bench_step.py's
activation_memory: bytes of saved tensors per storage, and a dispatch-mode count of the bytes held)."""

import importlib.util
import sys

import pytest
import torch

from neox_l2e.config import build_config


@pytest.fixture(scope="module")
def bench(repo_root_module):
    spec = importlib.util.spec_from_file_location("bench_step", repo_root_module / "tools" / "bench_step.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_step", mod)  # its dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def repo_root_module():
    from pathlib import Path

    return Path(__file__).resolve().parents[2]


def tiny(parallel_residual: bool, **extra):
    keys = dict(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        seq_length=32,
        max_position_embeddings=32,
        vocab_size=96,
        rotary_pct=0.25,
        gpt_j_residual=parallel_residual,
        no_weight_tying=True,
        make_vocab_size_divisible_by=8,
        checkpoint_activations=False,
    )
    keys.update(extra)
    return build_config(keys)


def test_counts_what_autograd_saves(bench):
    """The counter itself, on a case worked out by hand: y = gelu(x W^T) saves x (for W's gradient; W is not
    saved, as x needs no gradient) and the linear's output u (gelu's input)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 16, bias=False)
    x = torch.randn(4, 8)
    m = bench.activation_memory(lin, x, fn=lambda mod, b: torch.nn.functional.gelu(mod(b)).sum())
    assert m.saved_bytes == (4 * 8 + 4 * 16) * 4
    assert m.saved_tensors == 2
    # held at the peak: u and W's gradient (created in the backward) at least; x existed before: not counted
    assert 4 * 16 * 4 + 16 * 8 * 4 <= m.peak_bytes < m.saved_bytes + 16 * 8 * 4
    assert lin.weight.grad is None  # gradients are cleared after the count


@pytest.mark.parametrize("use_cache", [False, True], ids=["hf", "hf+cache"])
@pytest.mark.parametrize("parallel_residual", [True, False])
def test_ours_saves_and_holds_no_more_than_hf(bench, parallel_residual, use_cache):
    """Against HF without a KV cache (as the benchmarks time it) and with one (its config's default: its
    attention then reads the cache's copies of k and v, so it keeps no view of its fused qkv)."""
    cfg = tiny(parallel_residual)
    cpu = torch.device("cpu")
    ours = bench.build_ours(cfg, cfg.model.vocab_size, torch.float32, cpu)
    hf = bench.build_hf_like(cfg, cfg.model.vocab_size, ours, torch.float32, cpu)
    assert hf.config.use_cache is False
    hf.config.use_cache = use_cache
    batch = torch.randint(0, cfg.model.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    a, b = bench.activation_memory(ours, batch), bench.activation_memory(hf, batch)
    assert a.saved_bytes > 0 and a.peak_bytes > a.saved_bytes
    assert a.saved_bytes <= b.saved_bytes, (a, b)
    assert a.peak_bytes <= b.peak_bytes, (a, b)


def test_a_view_of_qkv_kept_for_backward_would_be_counted(bench, monkeypatch):
    """The comparison can fail: attention handed a view of the fused qkv as v (what ours did before, and what
    HF without a cache does) keeps the whole qkv saved, 2/3 of it more per layer."""
    from neox_l2e.model import gpt_neox

    cfg = tiny(True)
    cpu = torch.device("cpu")
    ours = bench.build_ours(cfg, cfg.model.vocab_size, torch.float32, cpu)
    batch = torch.randint(0, cfg.model.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def sdpa_on_qkv_view(q, k, v, **kw):  # v replaced by the same values as a view of a [.., 3 hd] tensor
        wide = torch.cat([q, k, v], dim=-1)
        return sdpa(q, k, wide[..., 2 * v.shape[-1] :], **kw)

    b = bench.activation_memory(ours, batch)
    with monkeypatch.context() as mp:  # F is torch.nn.functional: patched for our forward only
        mp.setattr(gpt_neox.F, "scaled_dot_product_attention", sdpa_on_qkv_view)
        a = bench.activation_memory(ours, batch)
    qkv = 2 * 32 * 3 * 64 * 4  # bytes of one layer's qkv
    assert a.saved_bytes - b.saved_bytes == cfg.model.num_layers * 2 * qkv // 3
