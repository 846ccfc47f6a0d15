"""Fixtures for the analysis tests: tiny models, a tiny tokenizer, the labelled dataset (all built offline)."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools"


def tiny_cfg(num_layers=2, hidden=32, vocab=128, seq=64, **extra):
    from neox_l2e.config import build_config
    keys = dict(num_layers=num_layers, hidden_size=hidden, num_attention_heads=4, seq_length=seq,
                max_position_embeddings=seq, vocab_size=vocab, rotary_pct=0.25, no_weight_tying=True, gpt_j_residual=True,
                make_vocab_size_divisible_by=1, init_method="small_init", output_layer_init_method="wang_init")
    keys.update(extra)
    return build_config(keys)


def train_tokenizer(texts, path, vocab=128):
    """A tiny byte-level BPE (tokenizers library, offline, < 1 s) saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.save(str(path))
    return path


@pytest.fixture(scope="session")
def labelled_jsonl(tmp_path_factory):
    """The no-download labelled dataset, small: built by the tool itself."""
    import subprocess
    out = tmp_path_factory.mktemp("labelled") / "code_en.jsonl"
    r = subprocess.run([sys.executable, str(TOOLS / "build_labelled_dataset.py"), str(out), "--docs-per-label", "12",
                        "--chars-per-doc", "400", "--labels", "python,c,english"], capture_output=True, text=True,
                       cwd=REPO)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory, labelled_jsonl):
    """A tiny random GPTNeoX exported as a Hugging Face folder, with a tokenizer.json trained on the labelled data."""
    from neox_l2e.interop.hf import write_hf_dir
    from neox_l2e.model import GPTNeoX
    root = tmp_path_factory.mktemp("tinyhf")
    texts = [json.loads(l)["text"] for l in open(labelled_jsonl)]
    tok = train_tokenizer(texts, root / "tokenizer.json", vocab=256)
    from tokenizers import Tokenizer
    vocab = Tokenizer.from_file(str(tok)).get_vocab_size()
    cfg = tiny_cfg(vocab=vocab, seq=256)
    torch.manual_seed(0)
    model = GPTNeoX(cfg).eval()
    return write_hf_dir(root / "hf", cfg, model.state_dict(), model.vocab_size, tokenizer_files=[tok])


def run_tool(name, *args, timeout=300):
    import subprocess
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, str(TOOLS / name), *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=timeout)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_hf_dir):
    return Path(tiny_hf_dir) / "tokenizer.json"


@pytest.fixture(scope="session")
def tiny_neox_ckpt(tmp_path_factory, tiny_tokenizer):
    """A neox-l2e checkpoint folder (latest + global_step3/) of a slightly bigger tiny model, written at TP=2
    (two shards the loader must merge), naming the tokenizer in its config. Returns (folder, TP=1 model)."""
    from tokenizers import Tokenizer

    from neox_l2e.model import GPTNeoX
    from neox_l2e.parallel.reshard import split_tp_state
    from neox_l2e.training.checkpoint import write_weights_checkpoint
    vocab = Tokenizer.from_file(str(tiny_tokenizer)).get_vocab_size()
    cfg = tiny_cfg(num_layers=4, hidden=64, vocab=vocab, seq=128, tokenizer_type="HFTokenizer",
                   vocab_file=str(tiny_tokenizer), make_vocab_size_divisible_by=8)
    torch.manual_seed(1)
    model = GPTNeoX(cfg).eval()
    cfg2 = cfg.replace(model_parallel_size=2)
    shards = split_tp_state(model.state_dict(), cfg2, 2)
    root = tmp_path_factory.mktemp("neoxckpt") / "checkpoints"
    write_weights_checkpoint(root, cfg2, shards, tag="global_step3")
    return root, model
