"""Indexed token dataset: PREFIX.bin (all documents' token ids, concatenated) + PREFIX.idx (offsets).

.idx layout (little endian): 32-byte header  magic(8s) version(u64) dtype_code(u8, 7 pad) n_docs(u64),
then int64 offsets[n_docs + 1] in tokens (offsets[0] == 0, offsets[-1] == number of tokens in .bin).
"""
from __future__ import annotations

import os
import struct
from collections.abc import Sequence

import numpy as np

MAGIC = b"MGDSIDX\x00"
VERSION = 1
_HEADER = struct.Struct("<8sQB7xQ")
_DTYPES = {1: np.dtype(np.uint16), 2: np.dtype(np.int32)}


def _dtype_code(vocab_size: int) -> int:
    return 1 if vocab_size < 65536 else 2


class IndexedDatasetWriter:
    """Streams documents into PREFIX.bin; `finalize` writes PREFIX.idx. Both files appear only at
    finalize (written as .tmp, then renamed; .bin first so a visible .idx implies a complete .bin)."""

    def __init__(self, prefix: str, vocab_size: int):
        self.prefix = prefix
        self.vocab_size = vocab_size
        self._code = _dtype_code(vocab_size)
        self._dtype = _DTYPES[self._code]
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self._bin = open(f"{prefix}.bin.tmp", "wb")
        self._offsets = [0]

    def add_document(self, ids: Sequence[int]) -> None:
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            doc = len(self._offsets) - 1
            raise ValueError(f"token id out of range [0, {self.vocab_size}) in document {doc} of {self.prefix}")
        self._bin.write(arr.astype(self._dtype).tobytes())
        self._offsets.append(self._offsets[-1] + arr.size)

    def finalize(self) -> None:
        self._bin.close()
        offsets = np.asarray(self._offsets, dtype="<i8")
        with open(f"{self.prefix}.idx.tmp", "wb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, self._code, len(offsets) - 1))
            f.write(offsets.tobytes())
        os.replace(f"{self.prefix}.bin.tmp", f"{self.prefix}.bin")
        os.replace(f"{self.prefix}.idx.tmp", f"{self.prefix}.idx")


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
                f"{idx_path}: size {os.path.getsize(idx_path)} != expected {expected_idx} for {n_docs} documents"
            )
        self.dtype = _DTYPES[code]
        self.offsets = np.memmap(idx_path, dtype="<i8", mode="r", offset=_HEADER.size, shape=(n_docs + 1,))
        self.num_tokens = int(self.offsets[-1])
        expected_bin = self.num_tokens * self.dtype.itemsize
        if os.path.getsize(bin_path) != expected_bin:
            raise ValueError(
                f"{bin_path}: size {os.path.getsize(bin_path)} != expected {expected_bin} bytes "
                f"({self.num_tokens} tokens); file truncated or not matching its .idx"
            )
        empty = np.empty(0, self.dtype)  # np.memmap cannot map an empty file
        self._tokens = np.memmap(bin_path, dtype=self.dtype, mode="r") if self.num_tokens else empty  # [num_tokens]

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
