"""Tokenizers: one interface (`Tokenizer`) over sentencepiece `.model` files and HuggingFace
`tokenizer.json` files, `load_tokenizer` to open either by its file, and sentencepiece training
(BPE, digits split, byte fallback)."""
from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence

import sentencepiece as spm
import tokenizers

SPECIAL_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
HF_FILE, SP_FILE, HF_CONFIG = "tokenizer.json", "tokenizer.model", "tokenizer_config.json"
# Names of the special tokens of a tokenizer.json whose tokenizer_config.json does not name them
# (DeepSeek-V3's first, then the usual ones); pad falls back to eos.
COMMON_NAMES = {
    "eos_token": ("<｜end▁of▁sentence｜>", "</s>", "<|endoftext|>", "<eos>"),
    "bos_token": ("<｜begin▁of▁sentence｜>", "<s>", "<bos>"),
    "pad_token": ("<｜▁pad▁｜>", "<pad>"),
}
KINDS_FIX = (f"give a HuggingFace {HF_FILE} (or a directory holding one) or a sentencepiece .model "
             f"(tools/train_tokenizer.py trains one)")


class Tokenizer(ABC):
    """What megads needs of a tokenizer, whichever library reads its file: `path` (the file
    loaded), `vocab_size` (every id is below it), `bos_id` (None when there is none), `eos_id`
    (separates documents), `pad_id` (eos when the tokenizer has no pad token), `identity`."""

    path: str
    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int

    def __init__(self, path: str, file_bytes: bytes):
        self.path = path
        self._identity = hashlib.sha256(file_bytes).hexdigest()

    @property
    def identity(self) -> str:
        """sha256 of the tokenizer file's bytes (those loaded). Two tokenizers of the same size map text
        to different ids, so a dataset records this to be refused with any other tokenizer."""
        return self._identity

    @abstractmethod
    def _encode_text(self, text: str) -> list[int]:
        """The ids of `text` alone, no bos or eos added."""

    @abstractmethod
    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """The ids of each text (no bos or eos), encoded in parallel by the library."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`; decode(encode(text)) == text."""

    @abstractmethod
    def _find(self, token: str) -> int | None:
        """The id of the exact token `token`, or None when the vocabulary lacks it."""

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """The ids of `text`, after bos and before eos when asked."""
        ids = self._encode_text(text)
        if bos:
            if self.bos_id is None:
                raise ValueError(f"tokenizer {self.path} has no bos token; encode without bos=True")
            ids = [self.bos_id] + ids
        return ids + [self.eos_id] if eos else ids

    def special_id(self, token: str) -> int:
        """The id of the exact token `token` (e.g. "<think>"); ValueError naming the file when absent."""
        found = self._find(token)
        if found is None:
            raise ValueError(f"tokenizer {self.path} has no token {token!r}; use a tokenizer that holds it (those "
                             f"of tools/train_tokenizer.py hold {' '.join(SPECIAL_TOKENS)}; add it to a "
                             f"{HF_FILE} as an added token)")
        return found


def load_tokenizer(path: str) -> Tokenizer:
    """The tokenizer at `path`: a HuggingFace `tokenizer.json` (any `.json` file), a sentencepiece
    `.model`, or a directory holding `tokenizer.json` (preferred) or `tokenizer.model`.
    FileNotFoundError or ValueError (one line naming the path and the fix) otherwise."""
    if os.path.isdir(path):
        for name in (HF_FILE, SP_FILE):
            if os.path.isfile(os.path.join(path, name)):
                return load_tokenizer(os.path.join(path, name))
        raise FileNotFoundError(f"tokenizer directory {path} holds neither {HF_FILE} nor {SP_FILE}; {KINDS_FIX}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer {path} does not exist; {KINDS_FIX}")
    if path.endswith(".json"):
        return HuggingFaceTokenizer(path)
    if path.endswith(".model"):
        return SentencePieceTokenizer(path)
    raise ValueError(f"tokenizer {path} is neither a .json nor a .model file; {KINDS_FIX}")


def _read(path: str, kind: str) -> bytes:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{kind} not found: {path}")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"cannot read {kind} {path}: {e.strerror}") from e


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model file. Decoding drops its control tokens (bos, eos, pad)."""

    def __init__(self, path: str):
        data = _read(path, "tokenizer model")
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(data)
        except RuntimeError as e:
            raise ValueError(f"cannot load sentencepiece model {path}: {e}") from e
        super().__init__(path, data)
        self.vocab_size = self._sp.GetPieceSize()
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.eos_id = self._sp.eos_id()
        if self.eos_id < 0:
            raise ValueError(f"tokenizer {path} defines no eos token (needed to separate documents); train one "
                             f"with eos_id set (tools/train_tokenizer.py does)")
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id

    def _encode_text(self, text: str) -> list[int]:
        return self._sp.EncodeAsIds(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.Encode(texts, out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.DecodeIds([int(i) for i in ids])

    def _find(self, token: str) -> int | None:
        found = self._sp.PieceToId(token)
        return found if self._sp.IdToPiece(found) == token else None

    def token_to_id(self, piece: str) -> int:
        """Id of an exact piece (e.g. "<answer>"); unk id if absent (`special_id` raises instead)."""
        return self._sp.PieceToId(piece)


class HuggingFaceTokenizer(Tokenizer):
    """A HuggingFace `tokenizer.json`, read by the `tokenizers` library. bos / eos / pad are those
    `tokenizer_config.json` beside it names, else found by common names (`COMMON_NAMES`). Nothing
    is added when encoding unless asked (bos=, eos=); decoding keeps every token, special ones
    included, so that decode(encode(text)) == text also for text holding them."""

    def __init__(self, path: str):
        data = _read(path, "tokenizer.json")
        try:
            self._tk = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # the library raises plain Exception
            raise ValueError(f"cannot load HuggingFace tokenizer {path}: {' '.join(str(e).split())}; give a "
                             f"tokenizer.json saved by the tokenizers library or transformers") from e
        super().__init__(path, data)
        # The size of the id space: get_vocab_size(with_added_tokens=True) unless the ids have gaps.
        self.vocab_size = max(self._tk.get_vocab(with_added_tokens=True).values()) + 1
        self._config_path = os.path.join(os.path.dirname(path), HF_CONFIG)
        names = self._configured_names()
        eos = self._special("eos_token", names)
        if eos is None:
            raise ValueError(f"tokenizer {path} has no eos token (needed to separate documents): no eos_token in "
                             f"{self._config_path} and none of {' '.join(COMMON_NAMES['eos_token'])} in its "
                             f"vocabulary; set eos_token there to the token that ends a document")
        self.eos_id = eos
        self.bos_id = self._special("bos_token", names)
        pad = self._special("pad_token", names)
        self.pad_id = eos if pad is None else pad

    def _configured_names(self) -> dict[str, str]:
        """The bos_token / eos_token / pad_token that the tokenizer_config.json beside the file names, if any."""
        if not os.path.isfile(self._config_path):
            return {}
        try:
            with open(self._config_path, encoding="utf-8") as f:
                config = json.load(f)
        except ValueError as e:
            raise ValueError(f"{self._config_path} (beside tokenizer {self.path}) is not readable JSON ({e}); fix "
                             f"or remove it") from e
        if not isinstance(config, dict):
            raise ValueError(f"{self._config_path} (beside tokenizer {self.path}) is not a JSON object; fix or "
                             f"remove it")
        names = {key: self._token_name(config.get(key), key) for key in COMMON_NAMES}
        return {key: name for key, name in names.items() if name is not None}

    def _token_name(self, value: object, key: str) -> str | None:
        """A special token's text as tokenizer_config.json gives it: a string, a dict with "content" (an
        AddedToken as transformers saves it) or null."""
        name = value.get("content") if isinstance(value, dict) else value
        if name is not None and not isinstance(name, str):
            raise ValueError(f"{self._config_path}: {key} is {json.dumps(value)[:40]}, not a token; set it to the "
                             f"token's text or null")
        return name

    def _special(self, key: str, configured: dict[str, str]) -> int | None:
        """The id of special token `key` (e.g. "eos_token"): the configured name, else the first common
        name in the vocabulary; None when there is neither."""
        if key in configured:
            found = self._find(configured[key])
            if found is None:
                raise ValueError(f"{self._config_path}: {key} {configured[key]!r} is not a token of {self.path}; "
                                 f"fix {key} there")
            return found
        return next((i for i in map(self._find, COMMON_NAMES[key]) if i is not None), None)

    def _encode_text(self, text: str) -> list[int]:
        return self._tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self._tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=False)

    def _find(self, token: str) -> int | None:
        return self._tk.token_to_id(token)


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
