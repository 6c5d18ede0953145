"""Data pipeline: synthetic corpus, tokenizer, indexed datasets, packing/sharding loader."""
from megads.data.indexed import IndexedDataset, IndexedDatasetWriter
from megads.data.loader import BatchLoader, PackedSequences
from megads.data.prepare import PreparedData, check_data_fits, prepare_data
from megads.data.synthetic import Problem, extract_answer, format_ok, generate_documents, make_problem
from megads.data.tokenizer import (HuggingFaceTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer,
                                   train_tokenizer)

__all__ = [
    "BatchLoader",
    "HuggingFaceTokenizer",
    "IndexedDataset",
    "IndexedDatasetWriter",
    "PackedSequences",
    "PreparedData",
    "Problem",
    "SentencePieceTokenizer",
    "Tokenizer",
    "check_data_fits",
    "extract_answer",
    "format_ok",
    "generate_documents",
    "load_tokenizer",
    "make_problem",
    "prepare_data",
    "train_tokenizer",
]
