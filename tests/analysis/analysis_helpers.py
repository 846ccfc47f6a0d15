"""Helpers for the analysis tests: tiny configs, a tiny tokenizer, running the tools, checking PNGs.
(A uniquely named module, so it never collides with another test folder's conftest.)"""

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools"


def tiny_cfg(num_layers=2, hidden=32, vocab=128, seq=64, **extra):
    from neox_l2e.config import build_config

    keys = dict(
        num_layers=num_layers,
        hidden_size=hidden,
        num_attention_heads=4,
        seq_length=seq,
        max_position_embeddings=seq,
        vocab_size=vocab,
        rotary_pct=0.25,
        no_weight_tying=True,
        gpt_j_residual=True,
        make_vocab_size_divisible_by=1,
        init_method="small_init",
        output_layer_init_method="wang_init",
    )
    keys.update(extra)
    return build_config(keys)


def train_tokenizer(texts, path, vocab=128):
    """A tiny byte-level BPE (tokenizers library, offline, < 1 s) saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.save(str(path))
    return path


def run_tool(name, *args, timeout=300):
    import subprocess

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run(
        [sys.executable, str(TOOLS / name), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=timeout,
    )


def png_has_content(path):
    """A PNG that exists, is not tiny, and is not a blank canvas."""
    import matplotlib.image as mpimg
    import numpy as np

    assert path.is_file() and path.stat().st_size > 5000, path
    img = mpimg.imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert float(np.std(img[..., :3])) > 0.02
    colours = {tuple(np.round(px, 1)) for px in img[::7, ::7, :3].reshape(-1, 3)}
    assert len(colours) > 5
