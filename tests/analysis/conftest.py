"""Fixtures for the analysis tests: tiny models, a tiny tokenizer, the labelled dataset (all built offline)."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from analysis_helpers import REPO, TOOLS, tiny_cfg, train_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def labelled_jsonl(tmp_path_factory):
    """The no-download labelled dataset, small: built by the tool itself."""
    import subprocess

    out = tmp_path_factory.mktemp("labelled") / "code_en.jsonl"
    r = subprocess.run(
        [
            sys.executable,
            str(TOOLS / "build_labelled_dataset.py"),
            str(out),
            "--docs-per-label",
            "12",
            "--chars-per-doc",
            "400",
            "--labels",
            "python,c,english",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory, labelled_jsonl):
    """A tiny random GPTNeoX exported as a Hugging Face folder, with a tokenizer.json trained on the labelled data."""
    from tokenizers import Tokenizer

    from neox_l2e.interop.hf import write_hf_dir
    from neox_l2e.model import GPTNeoX

    root = tmp_path_factory.mktemp("tinyhf")
    texts = [json.loads(l)["text"] for l in open(labelled_jsonl)]
    tok = train_tokenizer(texts, root / "tokenizer.json", vocab=256)
    vocab = Tokenizer.from_file(str(tok)).get_vocab_size()
    cfg = tiny_cfg(vocab=vocab, seq=256)
    torch.manual_seed(0)
    model = GPTNeoX(cfg).eval()
    return write_hf_dir(root / "hf", cfg, model.state_dict(), model.vocab_size, tokenizer_files=[tok])


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_hf_dir):
    return Path(tiny_hf_dir) / "tokenizer.json"


@pytest.fixture(scope="session")
def tiny_neox_ckpt(tmp_path_factory, tiny_tokenizer):
    """A neox-l2e checkpoint folder (latest + global_step3/) of a slightly bigger tiny model, written at TP=2
    (two shards the loader must merge), naming the tokenizer in its config. Returns (folder, TP=1 model)."""
    from tokenizers import Tokenizer

    from neox_l2e.checkpoint import write_weights_checkpoint
    from neox_l2e.checkpoint.tp_states import split_tp_state
    from neox_l2e.model import GPTNeoX

    vocab = Tokenizer.from_file(str(tiny_tokenizer)).get_vocab_size()
    cfg = tiny_cfg(
        num_layers=4,
        hidden=64,
        vocab=vocab,
        seq=128,
        tokenizer_type="HFTokenizer",
        vocab_file=str(tiny_tokenizer),
        make_vocab_size_divisible_by=8,
    )
    torch.manual_seed(1)
    model = GPTNeoX(cfg).eval()
    cfg2 = cfg.replace(model_parallel_size=2)
    shards = split_tp_state(model.state_dict(), cfg2, 2)
    root = tmp_path_factory.mktemp("neoxckpt") / "checkpoints"
    write_weights_checkpoint(root, cfg2, shards, tag="global_step3")
    return root, model
