"""SentencePiece tokenizer: training (BPE, digits split, byte fallback) and a thin encode/decode wrapper."""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence

import sentencepiece as spm

SPECIAL_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class Tokenizer:
    """Wraps a SentencePiece model file."""

    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"tokenizer model not found: {model_path}")
        self.model_path = model_path
        self._sp = spm.SentencePieceProcessor()
        try:
            with open(model_path, "rb") as f:
                proto = f.read()
            self._sp.LoadFromSerializedProto(proto)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"cannot load sentencepiece model {model_path}: {e}") from e
        self._identity = hashlib.sha256(proto).hexdigest()
        self.vocab_size: int = self._sp.GetPieceSize()
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()
        if self.eos_id < 0:
            raise ValueError(f"tokenizer {model_path} defines no eos token (needed to separate documents)")
        self.pad_id: int = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id

    @property
    def identity(self) -> str:
        """sha256 of the model file's bytes (those loaded). Two tokenizers of the same size map text to
        different ids, so a dataset records this to be refused with any other tokenizer."""
        return self._identity

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return self._sp.EncodeAsIds(text, add_bos=bos, add_eos=eos)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once (multi-threaded in sentencepiece)."""
        return self._sp.Encode(texts, out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.DecodeIds([int(i) for i in ids])

    def token_to_id(self, piece: str) -> int:
        """Id of an exact piece (e.g. "<answer>"); unk id if absent."""
        return self._sp.PieceToId(piece)


def _lines(text_files: list[str]) -> Iterator[str]:
    # sentencepiece trains on sentences: each non-empty line is one. Newlines themselves are
    # encoded through byte fallback (<0x0A>), so decode(encode(x)) == x still holds.
    for path in text_files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.rstrip("\n")
                if line:
                    yield line


def train_tokenizer(text_files: list[str], model_prefix: str, vocab_size: int) -> str:
    """Train a BPE model on the lines of `text_files`; returns the path of `{model_prefix}.model`.
    Deterministic for identical input (BPE training has no sampling). `vocab_size` is an upper
    bound: a corpus too small to fill it yields a smaller vocabulary."""
    for path in text_files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer training input not found: {path}")
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=_lines(text_files),
            model_prefix=model_prefix,
            model_type="bpe",
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            character_coverage=1.0,
            split_digits=True,
            byte_fallback=True,
            user_defined_symbols=list(SPECIAL_TOKENS),
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            num_threads=2,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(f"tokenizer training with vocab_size={vocab_size} failed: {e}") from e
    return f"{model_prefix}.model"
