"""sdpa-backend: attention through torch scaled_dot_product_attention with torch's choice of kernel ("auto") or
one forced. CPU: flash (torch's CPU flash kernel) and math give the logits and gradients of auto; a kernel that
cannot run on CPU raises (the forcing takes effect). GPU (skipped on CPU): bf16 training forward/backward runs with
only the flash kernel allowed and matches the math kernel; auto picks a fused kernel (flash, or cuDNN / efficient
where torch prefers them), not the math one."""

import pytest
import torch

from neox_l2e.config import ConfigError, build_config
from neox_l2e.model import GPTNeoX


def cfg(backend="auto", hidden=64, heads=4, **extra):
    keys = dict(
        num_layers=2,
        hidden_size=hidden,
        num_attention_heads=heads,
        seq_length=32,
        vocab_size=96,
        rotary_pct=0.25,
        gpt_j_residual=True,
        no_weight_tying=True,
        make_vocab_size_divisible_by=8,
        sdpa_backend=backend,
    )
    keys.update(extra)
    return build_config(keys)


def step(model, tokens):
    """Logits and the embedding's gradient of one forward/backward."""
    model.zero_grad(set_to_none=True)
    logits = model(tokens).logits
    logits.float().pow(2).mean().backward()
    return logits.detach().float(), model.gpt_neox.layers[0].attention.query_key_value.weight.grad.float()


@pytest.mark.parametrize("backend", ["flash", "math"])
def test_forced_kernel_matches_auto_on_cpu(backend):
    tokens = torch.randint(0, 96, (2, 32), generator=torch.Generator().manual_seed(0))
    ref = GPTNeoX(cfg("auto"), seed=3).train()
    other = GPTNeoX(cfg(backend), seed=3).train()
    (a, ga), (b, gb) = step(ref, tokens), step(other, tokens)
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5) and torch.allclose(ga, gb, atol=1e-5, rtol=1e-4)


def test_forced_kernel_that_cannot_run_raises_on_cpu():
    model = GPTNeoX(cfg("efficient"), seed=3)  # the memory-efficient kernel is CUDA-only
    with pytest.raises(RuntimeError, match="(?i)no (viable|available) (backend|kernel)"):
        model(torch.zeros(1, 32, dtype=torch.long))


def test_unknown_backend_is_refused():
    with pytest.raises(ConfigError, match="sdpa-backend: 'fast' is not supported"):
        cfg("fast")


@pytest.mark.gpu
def test_flash_kernel_runs_bf16_on_cuda_and_auto_picks_a_fused_kernel():
    dev = torch.device("cuda")
    tokens = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(0)).to(dev)
    out = {}
    for backend in ("flash", "math", "auto"):
        model = GPTNeoX(cfg(backend, hidden=256, heads=4), seed=3).to(dev, torch.bfloat16).train()  # head dim 64
        out[backend] = step(model, tokens)
    (f, gf), (m, gm) = out["flash"], out["math"]
    assert torch.allclose(f, m, atol=5e-2, rtol=5e-2) and torch.allclose(gf, gm, atol=5e-2, rtol=1e-1)
    model = GPTNeoX(cfg("auto", hidden=256, heads=4), seed=3).to(dev, torch.bfloat16).train()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step(model, tokens)
        torch.cuda.synchronize()
    names = {e.name for e in prof.events()}
    fused = [n for n in names if any(k in n for k in ("flash", "cudnn", "efficient"))]
    assert fused, sorted(n for n in names if "attention" in n)  # auto: a fused kernel, not the math one
