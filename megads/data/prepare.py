"""Turn a DataConfig into a tokenizer plus train/valid indexed datasets (building the synthetic set once),
and refuse data that does not fit the model or the batch before any training work starts."""
from __future__ import annotations

import fcntl
import hashlib
import itertools
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from megads.data.indexed import IndexedDataset, IndexedDatasetWriter
from megads.data.loader import samples_per_epoch
from megads.data.synthetic import generate_documents, iter_documents
from megads.data.tokenizer import SentencePieceTokenizer, Tokenizer, load_tokenizer, train_tokenizer

_T = TypeVar("_T")
_SYNTHETIC_FILES = ("corpus.txt", "tokenizer.model", "train.bin", "train.idx", "train.meta.json",
                    "valid.bin", "valid.idx", "valid.meta.json")
log = logging.getLogger("megads")


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    train: IndexedDataset
    valid: IndexedDataset


@dataclass(frozen=True)
class _Settings:
    """The config settings an error about each part of the data names."""
    train: str
    valid: str
    tokenizer: str


_INDEXED = _Settings("data.train_path", "data.valid_path", "data.tokenizer")
_SYNTHETIC = _Settings("data.cache_dir", "data.cache_dir", "data.cache_dir")


def prepare_data(cfg: Any, vocab_size: int) -> PreparedData:
    """`cfg` is a megads.config.DataConfig; `vocab_size` is the model's (model.vocab_size). Raises
    ValueError naming the setting when the tokenizer or a dataset does not fit the model, or a dataset
    was made with another tokenizer: training would otherwise fail late (out-of-range ids) or learn
    from scrambled text (another tokenizer of the same size)."""
    if cfg.source == "synthetic":
        data, settings = _open_dir(_build_synthetic(cfg, vocab_size)), _SYNTHETIC
    elif cfg.source == "indexed":
        data, settings = _open_indexed(cfg), _INDEXED
    else:
        raise ValueError(f"data.source must be 'synthetic' or 'indexed', got {cfg.source!r}")
    if data.tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"{settings.tokenizer}: tokenizer {data.tokenizer.path} has {data.tokenizer.vocab_size} tokens but "
            f"model.vocab_size={vocab_size}; set model.vocab_size >= {data.tokenizer.vocab_size}"
        )
    for setting, dataset in ((settings.train, data.train), (settings.valid, data.valid)):
        _check_tokenizer(setting, dataset, data.tokenizer, settings.tokenizer)
        _check_ids_fit(setting, dataset, vocab_size)
    return data


def _check_tokenizer(setting: str, dataset: IndexedDataset, tokenizer: Tokenizer, tokenizer_setting: str) -> None:
    """Ids mean something only under the tokenizer that made them; one of the same size would train
    without any error on scrambled text."""
    recorded = dataset.meta["tokenizer_sha256"] if dataset.meta else None
    if recorded is None:
        log.warning(f"{setting}: dataset {dataset.prefix} records no tokenizer identity, so it cannot be "
                    f"checked against {tokenizer_setting}; re-run tools/preprocess_data.py to record it")
    elif recorded != tokenizer.identity:
        raise ValueError(
            f"{setting}: dataset {dataset.prefix} was made with tokenizer {dataset.meta['tokenizer']} "
            f"(sha256 {recorded[:12]}, {dataset.meta['vocab_size']} tokens), not with {tokenizer_setting}="
            f"{tokenizer.path} (sha256 {tokenizer.identity[:12]}, {tokenizer.vocab_size} tokens); set "
            f"{tokenizer_setting} to the dataset's tokenizer or re-run tools/preprocess_data.py with this one"
        )


def _check_ids_fit(setting: str, dataset: IndexedDataset, vocab_size: int) -> None:
    """An id >= model.vocab_size would index past the embedding table mid-training (IndexError on
    CPU, a device assert on GPU)."""
    top = dataset.max_token_id()
    if top is not None and top >= vocab_size:
        raise ValueError(
            f"{setting}: dataset {dataset.prefix} holds token id {top} but model.vocab_size={vocab_size}; "
            f"set model.vocab_size > {top} or rebuild the dataset with the tokenizer of data.tokenizer"
        )


def check_data_fits(data: PreparedData, cfg_data: Any, seq_len: int, global_batch: int) -> None:
    """Raise ValueError naming the setting when the train split packs into fewer samples of seq_len+1
    tokens than one global batch, or the valid split into none: called right after prepare_data so
    the run stops before process groups exist rather than with a traceback on every rank."""
    if cfg_data.source == "synthetic":
        train, valid = ("data.synthetic_docs", cfg_data.synthetic_docs), ("data.synthetic_valid_docs",
                                                                          cfg_data.synthetic_valid_docs)
    else:
        train, valid = ("data.train_path", cfg_data.train_path), ("data.valid_path", cfg_data.valid_path)
    _check_samples(data.train, seq_len, global_batch, *train,
                   f"one global batch (train.global_batch={global_batch})", "train.seq_len or train.global_batch")
    _check_samples(data.valid, seq_len, 1, *valid, "one sample", "train.seq_len")


def _check_samples(dataset: IndexedDataset, seq_len: int, need: int, setting: str, value: Any, what: str,
                   knobs: str) -> None:
    have = samples_per_epoch(dataset, seq_len)
    if have < need:
        more = f"raise {setting}" if setting.startswith("data.synthetic") else f"point {setting} at a larger dataset"
        raise ValueError(
            f"{setting}={value!r}: {dataset.prefix} packs into {have} samples of train.seq_len+1={seq_len + 1} "
            f"tokens, fewer than {what}; {more} or lower {knobs}"
        )


def _open_setting(setting: str, factory: Callable[[str], _T], path: str | None) -> _T:
    if path is None:
        raise ValueError(f"data.source='indexed' requires {setting} to be set")
    try:
        return factory(path)
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"{setting}={path!r}: {e}") from e


def _open_indexed(cfg: Any) -> PreparedData:
    return PreparedData(
        tokenizer=_open_setting("data.tokenizer", load_tokenizer, cfg.tokenizer),
        train=_open_setting("data.train_path", IndexedDataset, cfg.train_path),
        valid=_open_setting("data.valid_path", IndexedDataset, cfg.valid_path),
    )


def _open_dir(path: str) -> PreparedData:
    return PreparedData(
        tokenizer=SentencePieceTokenizer(os.path.join(path, "tokenizer.model")),
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
        tokenizer = SentencePieceTokenizer(train_tokenizer([corpus], os.path.join(out_dir, "tokenizer"), vocab_size))
    except ValueError as e:
        raise ValueError(f"synthetic data: cannot train a tokenizer for model.vocab_size={vocab_size}: {e}") from e
    for split, docs in (("train", train_docs), ("valid", valid_docs)):
        with IndexedDatasetWriter(os.path.join(out_dir, split), tokenizer.vocab_size,
                                  tokenizer_sha256=tokenizer.identity, tokenizer_name="tokenizer.model") as writer:
            for ids in tokenizer.encode_batch(docs):
                writer.add_document(ids)
            writer.finalize()
