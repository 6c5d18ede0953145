"""Turn a DataConfig into a tokenizer plus train/valid indexed datasets (building the synthetic set once)."""
from __future__ import annotations

import fcntl
import hashlib
import itertools
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from megads.data.indexed import IndexedDataset, IndexedDatasetWriter
from megads.data.synthetic import generate_documents, iter_documents
from megads.data.tokenizer import Tokenizer, train_tokenizer

_T = TypeVar("_T")
_SYNTHETIC_FILES = ("corpus.txt", "tokenizer.model", "train.bin", "train.idx", "valid.bin", "valid.idx")


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    train: IndexedDataset
    valid: IndexedDataset


def prepare_data(cfg: Any, vocab_size: int) -> PreparedData:
    """`cfg` is a megads.config.DataConfig; `vocab_size` is the model's (model.vocab_size)."""
    if cfg.source == "synthetic":
        data = _open_dir(_build_synthetic(cfg, vocab_size))
    elif cfg.source == "indexed":
        data = _open_indexed(cfg)
    else:
        raise ValueError(f"data.source must be 'synthetic' or 'indexed', got {cfg.source!r}")
    if data.tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"tokenizer {data.tokenizer.model_path} has {data.tokenizer.vocab_size} tokens but "
            f"model.vocab_size={vocab_size}; set model.vocab_size >= {data.tokenizer.vocab_size}"
        )
    return data


def _open_setting(setting: str, factory: Callable[[str], _T], path: str | None) -> _T:
    if path is None:
        raise ValueError(f"data.source='indexed' requires {setting} to be set")
    try:
        return factory(path)
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"{setting}={path!r}: {e}") from e


def _open_indexed(cfg: Any) -> PreparedData:
    return PreparedData(
        tokenizer=_open_setting("data.tokenizer", Tokenizer, cfg.tokenizer),
        train=_open_setting("data.train_path", IndexedDataset, cfg.train_path),
        valid=_open_setting("data.valid_path", IndexedDataset, cfg.valid_path),
    )


def _open_dir(path: str) -> PreparedData:
    return PreparedData(
        tokenizer=Tokenizer(os.path.join(path, "tokenizer.model")),
        train=IndexedDataset(os.path.join(path, "train")),
        valid=IndexedDataset(os.path.join(path, "valid")),
    )


def _complete(path: str) -> bool:
    return all(os.path.isfile(os.path.join(path, f)) for f in _SYNTHETIC_FILES)


def _build_synthetic(cfg: Any, vocab_size: int) -> str:
    """Return the synthetic data directory, building it if needed. Concurrent callers serialize on a
    lock file; the directory only ever appears complete (built under a temp name, then renamed)."""
    name = f"synthetic-s{cfg.seed}-n{cfg.synthetic_docs}-v{cfg.synthetic_valid_docs}-V{vocab_size}"
    final = os.path.join(cfg.cache_dir, name)
    if _complete(final):
        return final
    os.makedirs(cfg.cache_dir, exist_ok=True)
    with open(f"{final}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if _complete(final):
            return final
        shutil.rmtree(final, ignore_errors=True)  # incomplete leftovers, e.g. deleted files
        tmp = tempfile.mkdtemp(prefix=f"{name}.tmp-", dir=cfg.cache_dir)
        try:
            _write_synthetic(tmp, cfg, vocab_size)
            os.chmod(tmp, 0o755)  # mkdtemp creates 0700
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _valid_seed(seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"megads-valid-{seed}".encode()).digest()[:8], "little")


def _write_synthetic(out_dir: str, cfg: Any, vocab_size: int) -> None:
    train_docs = generate_documents(cfg.seed, cfg.synthetic_docs)
    seen = set(train_docs)  # held out: validation documents never occur verbatim in training
    valid_docs = list(itertools.islice((d for d in iter_documents(_valid_seed(cfg.seed)) if d not in seen),
                                       cfg.synthetic_valid_docs))
    corpus = os.path.join(out_dir, "corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:  # one document per blank-line separated paragraph
        f.write("\n\n".join(train_docs) + "\n")
    try:
        tokenizer = Tokenizer(train_tokenizer([corpus], os.path.join(out_dir, "tokenizer"), vocab_size))
    except ValueError as e:
        raise ValueError(f"synthetic data: cannot train a tokenizer for model.vocab_size={vocab_size}: {e}") from e
    for split, docs in (("train", train_docs), ("valid", valid_docs)):
        writer = IndexedDatasetWriter(os.path.join(out_dir, split), tokenizer.vocab_size)
        for ids in tokenizer.encode_batch(docs):
            writer.add_document(ids)
        writer.finalize()
