"""Data pipeline: tokenizers, the Megatron/NeoX mmap indexed dataset, GPT samples, the default corpus.

    from neox_l2e.data import (DataError, build_tokenizer, MMapIndexedDataset, write_indexed_dataset,
                               build_datasets, SampleIterator, prepare_default_corpus)

Every user-fixable problem raises DataError (a ValueError) with one line naming the file and the problem.
"""

from .corpus import prepare_default_corpus
from .errors import DataError
from .gpt_dataset import DATA_ORDERS, BlendedDataset, GPTDataset, build_datasets, parse_split, split_ranges
from .indexed_dataset import IndexedDatasetWriter, MMapIndexedDataset, token_dtype, write_indexed_dataset
from .iterator import SampleIterator
from .sample_index import HAVE_CPP, build_epoch_order, build_neox_order, build_sample_idx
from .tokenizer import HFTokenizer, SPMTokenizer, build_tokenizer, train_sentencepiece

__all__ = [
    "DataError",
    "build_tokenizer",
    "MMapIndexedDataset",
    "write_indexed_dataset",
    "build_datasets",
    "SampleIterator",
    "prepare_default_corpus",
    "BlendedDataset",
    "GPTDataset",
    "IndexedDatasetWriter",
    "HFTokenizer",
    "SPMTokenizer",
    "train_sentencepiece",
    "token_dtype",
    "parse_split",
    "split_ranges",
    "build_epoch_order",
    "build_neox_order",
    "build_sample_idx",
    "HAVE_CPP",
    "DATA_ORDERS",
]
