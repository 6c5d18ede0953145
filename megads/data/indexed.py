"""Indexed token dataset: PREFIX.bin (all documents' token ids, concatenated) + PREFIX.idx (offsets)
+ PREFIX.meta.json (what made it).

.idx layout (little endian): 32-byte header  magic(8s) version(u64) dtype_code(u8, 7 pad) n_docs(u64),
then int64 offsets[n_docs + 1] in tokens (offsets[0] == 0, offsets[-1] == number of tokens in .bin).
.meta.json: {"tokenizer_sha256", "tokenizer" (file name), "vocab_size", "max_token_id" (null if no
tokens), "documents", "tokens"}; tokenizer fields are null when the writer was given none. Datasets
written before the sidecar existed have none.
"""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

MAGIC = b"MGDSIDX\x00"
VERSION = 1
_HEADER = struct.Struct("<8sQB7xQ")
_DTYPES = {1: np.dtype(np.uint16), 2: np.dtype(np.int32)}
_META_KEYS = ("tokenizer_sha256", "tokenizer", "vocab_size", "max_token_id", "documents", "tokens")
_CHUNK = 1 << 22  # elements per step when scanning a memmap, so a large file never loads at once
_REBUILD = "the dataset is damaged or its files come from different builds; rebuild it with tools/preprocess_data.py"


def _dtype_code(vocab_size: int) -> int:
    return 1 if vocab_size < 65536 else 2


class IndexedDatasetWriter:
    """Streams documents into PREFIX.bin; `finalize` writes PREFIX.meta.json and PREFIX.idx. All files
    appear only at finalize (written as .tmp, then renamed; .idx last so a visible .idx implies a
    complete .bin and sidecar). Used as a context manager, it removes its .tmp files if the block
    ends without finalize (bad input found midway leaves nothing behind)."""

    def __init__(self, prefix: str, vocab_size: int, *, tokenizer_sha256: str | None = None,
                 tokenizer_name: str | None = None):
        self.prefix = prefix
        self.vocab_size = vocab_size
        self._code = _dtype_code(vocab_size)
        self._dtype = _DTYPES[self._code]
        self._tokenizer = {"tokenizer_sha256": tokenizer_sha256, "tokenizer": tokenizer_name}
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self._bin = open(f"{prefix}.bin.tmp", "wb")
        self._offsets = [0]
        self._max_id = -1
        self._finalized = False

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._finalized:
            self.abort()

    def add_document(self, ids: Sequence[int]) -> None:
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            doc = len(self._offsets) - 1
            raise ValueError(f"token id out of range [0, {self.vocab_size}) in document {doc} of {self.prefix}")
        self._bin.write(arr.astype(self._dtype).tobytes())
        self._offsets.append(self._offsets[-1] + arr.size)
        if arr.size:
            self._max_id = max(self._max_id, int(arr.max()))

    def finalize(self) -> None:
        self._bin.close()
        offsets = np.asarray(self._offsets, dtype="<i8")
        with open(f"{self.prefix}.idx.tmp", "wb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, self._code, len(offsets) - 1))
            f.write(offsets.tobytes())
        meta = {**self._tokenizer, "vocab_size": self.vocab_size,
                "max_token_id": self._max_id if self._max_id >= 0 else None,
                "documents": len(offsets) - 1, "tokens": int(offsets[-1])}
        with open(f"{self.prefix}.meta.json.tmp", "w") as f:
            json.dump(meta, f, indent=1)
        for ext in (".bin", ".meta.json", ".idx"):
            os.replace(f"{self.prefix}{ext}.tmp", f"{self.prefix}{ext}")
        self._finalized = True

    def abort(self) -> None:
        """Drop everything written so far."""
        self._bin.close()
        for ext in (".bin", ".meta.json", ".idx"):
            if os.path.exists(f"{self.prefix}{ext}.tmp"):
                os.remove(f"{self.prefix}{ext}.tmp")


class IndexedDataset:
    """Read-only memory-mapped view of a PREFIX.bin/.idx pair."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        idx_path, bin_path = f"{prefix}.idx", f"{prefix}.bin"
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"indexed dataset file not found: {path}")
        with open(idx_path, "rb") as f:
            head = f.read(_HEADER.size)
        if len(head) < _HEADER.size:
            raise ValueError(f"{idx_path}: truncated header, not an indexed dataset index")
        magic, version, code, n_docs = _HEADER.unpack(head)
        if magic != MAGIC:
            raise ValueError(f"{idx_path}: bad magic {magic!r} (expected {MAGIC!r}), not a megads index")
        if version != VERSION or code not in _DTYPES:
            raise ValueError(f"{idx_path}: unsupported version {version} / dtype code {code}")
        expected_idx = _HEADER.size + 8 * (n_docs + 1)
        if os.path.getsize(idx_path) != expected_idx:
            raise ValueError(
                f"{idx_path}: size {os.path.getsize(idx_path)} != expected {expected_idx} for {n_docs} documents; "
                f"{_REBUILD}"
            )
        self.dtype = _DTYPES[code]
        self.offsets = np.memmap(idx_path, dtype="<i8", mode="r", offset=_HEADER.size, shape=(n_docs + 1,))
        _check_offsets(idx_path, self.offsets)
        self.num_tokens = int(self.offsets[-1])
        expected_bin = self.num_tokens * self.dtype.itemsize
        if os.path.getsize(bin_path) != expected_bin:
            raise ValueError(
                f"{bin_path}: size {os.path.getsize(bin_path)} != expected {expected_bin} bytes "
                f"({self.num_tokens} tokens per {idx_path}); {_REBUILD}"
            )
        empty = np.empty(0, self.dtype)  # np.memmap cannot map an empty file
        self._tokens = np.memmap(bin_path, dtype=self.dtype, mode="r") if self.num_tokens else empty  # [num_tokens]
        self.meta: dict[str, Any] | None = _read_meta(f"{prefix}.meta.json", n_docs, self.num_tokens)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        """Token ids of document i ([len_i], dataset dtype, view into the memmap)."""
        if not 0 <= i < len(self):
            raise IndexError(f"document {i} out of range for {len(self)} documents in {self.prefix}")
        return self._tokens[self.offsets[i] : self.offsets[i + 1]]

    def tokens(self, start: int, length: int) -> np.ndarray:
        """Slice [start, start + length) of the flat token stream (documents concatenated)."""
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IndexError(f"token range [{start}, {start + length}) out of range for {self.num_tokens} tokens")
        return self._tokens[start : start + length]

    def max_token_id(self) -> int | None:
        """Largest token id (None without tokens): recorded in the sidecar, or found by scanning .bin
        for a dataset written before sidecars existed."""
        if self.meta is not None:
            return self.meta["max_token_id"]
        maxima = [int(self._tokens[i : i + _CHUNK].max()) for i in range(0, self.num_tokens, _CHUNK)]
        return max(maxima, default=None)


def _check_offsets(idx_path: str, offsets: np.ndarray) -> None:
    """Offsets must start at 0 and never decrease: a damaged .idx would otherwise slice documents out
    of the wrong tokens and train silently on garbage."""
    if offsets[0] != 0:
        raise ValueError(f"{idx_path}: first offset is {int(offsets[0])}, not 0; {_REBUILD}")
    for start in range(0, len(offsets) - 1, _CHUNK):
        steps = np.diff(offsets[start : start + _CHUNK + 1])
        if (steps < 0).any():
            doc = start + int(np.argmax(steps < 0))
            raise ValueError(f"{idx_path}: offsets decrease at document {doc} (out of order); {_REBUILD}")


def _read_meta(meta_path: str, n_docs: int, n_tokens: int) -> dict[str, Any] | None:
    """The sidecar, checked against the .idx it sits beside; None if there is none."""
    if not os.path.isfile(meta_path):
        return None
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{meta_path}: not valid JSON ({e}); {_REBUILD}") from e
    missing = [k for k in _META_KEYS if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise ValueError(f"{meta_path}: missing {', '.join(missing)}; {_REBUILD}")
    if (meta["documents"], meta["tokens"]) != (n_docs, n_tokens):
        raise ValueError(
            f"{meta_path}: records {meta['documents']} documents / {meta['tokens']} tokens but the .idx holds "
            f"{n_docs} / {n_tokens}; {_REBUILD}"
        )
    return meta
