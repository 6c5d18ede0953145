"""Bad data is refused up front with one line naming the file or setting and the fix: the
preprocessing tool's input errors, datasets that do not fit the model or its tokenizer, a damaged
.idx, and corpora too small for one batch."""
from __future__ import annotations

import logging
import os
import random
import re
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

from megads.data import (
    IndexedDataset,
    IndexedDatasetWriter,
    SentencePieceTokenizer,
    check_data_fits,
    generate_documents,
    indexed,
    prepare_data,
    train_tokenizer,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 320  # both tiny tokenizers fill it exactly


def _train(directory, name, lines):
    text = directory / f"{name}.txt"
    text.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return SentencePieceTokenizer(train_tokenizer([str(text)], str(directory / name), VOCAB))


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """Two tokenizers of the same size trained on different text: ids from one are noise to the other."""
    d = tmp_path_factory.mktemp("tok")
    rng = random.Random(0)
    words = ["".join(rng.choice("klmnopqrstuvw") for _ in range(rng.randint(2, 7))) for _ in range(300)]
    a = _train(d, "a", generate_documents(0, 200))
    b = _train(d, "b", [" ".join(rng.choice(words) for _ in range(12)) for _ in range(200)])
    assert a.vocab_size == b.vocab_size == VOCAB
    return a, b


def _write(prefix, docs, vocab_size, tok=None):
    """Write a dataset; with `tok`, record it as the dataset's tokenizer (as tools/preprocess_data.py does)."""
    identity = {} if tok is None else {"tokenizer_sha256": tok.identity,
                                       "tokenizer_name": os.path.basename(tok.path)}
    writer = IndexedDatasetWriter(str(prefix), vocab_size, **identity)
    for d in docs:
        writer.add_document(d)
    writer.finalize()
    return str(prefix)


def _indexed_cfg(train, valid, tok, **kw):
    return types.SimpleNamespace(source="indexed", train_path=train, valid_path=valid, tokenizer=tok.path,
                                 cache_dir=".megads_cache", synthetic_docs=0, synthetic_valid_docs=0, seed=0, **kw)


def _encoded(tok, n=40):
    return [tok.encode(d) for d in generate_documents(5, n)]


# ---------------------------------------------------------------- tools/preprocess_data.py

JSONL_CASES = {
    "empty": (b"", "no documents"),
    "blank_lines_only": (b"\n  \n\n", "no documents"),
    "malformed_json_line_3": (b'{"text": "a"}\n\n{"text": "c"\n{"text": "d"}\n', ":3: malformed JSON"),
    "non_utf8_line_2": (b'{"text": "a"}\n{"text": "caf\xe9"}\n', ":2: not UTF-8"),
    "text_null": (b'{"text": "a"}\n{"text": null}\n', ":2: field 'text' is null, not a string"),
    "text_not_string": (b'{"text": 7}\n', ":1: field 'text' is 7, not a string"),
    "text_missing": (b'{"content": "a"}\n', ":1: no field 'text'; choose another with --json-key"),
    "not_an_object": (b'["a"]\n', ":1: expected a JSON object"),
}


def _preprocess(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def _assert_refused(res, out_dir, *fragments):
    """Exit 2, one line `preprocess_data.py: error: ...` with every fragment, no traceback, no output files."""
    err = res.stderr.strip()
    assert res.returncode == 2 and len(err.splitlines()) == 1, res.stderr
    assert err.startswith("preprocess_data.py: error: ") and all(f in err for f in fragments), err
    assert not out_dir.exists() or os.listdir(out_dir) == []


@pytest.mark.parametrize("case", JSONL_CASES)
def test_preprocess_bad_jsonl(tmp_path, tokenizers, case):
    content, message = JSONL_CASES[case]
    src = tmp_path / "corpus.jsonl"
    src.write_bytes(content)
    res = _preprocess("--input", src, "--tokenizer", tokenizers[0].path, "--output-prefix", tmp_path / "out/ds")
    where = str(src) if message == "no documents" else f"{src}{message}"
    _assert_refused(res, tmp_path / "out", where, message)


def test_preprocess_bad_text_file_names_line(tmp_path, tokenizers):
    src = tmp_path / "corpus.txt"
    src.write_bytes(b"first doc\n\nsecond\r\ndoc with caf\xe9\n")
    res = _preprocess("--input", src, "--tokenizer", tokenizers[0].path, "--output-prefix", tmp_path / "out/ds")
    _assert_refused(res, tmp_path / "out", f"{src}:4: not UTF-8", "convert the file to UTF-8")


@pytest.mark.parametrize("missing", ["--input", "--tokenizer"])
def test_preprocess_missing_file(tmp_path, tokenizers, missing):
    src = tmp_path / "corpus.txt"
    src.write_text("a document\n", encoding="utf-8")
    paths = {"--input": src, "--tokenizer": tokenizers[0].path, missing: tmp_path / "nope"}
    res = _preprocess(*[x for kv in paths.items() for x in kv], "--output-prefix", tmp_path / "out/ds")
    _assert_refused(res, tmp_path / "out", f"{tmp_path / 'nope'}: no such file; check {missing}")


# ---------------------------------------------------------------- prepare_data

@pytest.mark.parametrize("sidecar", [True, False])
def test_ids_beyond_model_vocab_refused(tmp_path, tokenizers, sidecar):
    """A dataset holding id 700 for a 512-token model: refused up front, not an IndexError mid-training."""
    tok = tokenizers[0]
    train = _write(tmp_path / "train", [[5, 700, 6], [7]], 1000)
    valid = _write(tmp_path / "valid", [[5, 6]], 1000)
    if not sidecar:  # a dataset made before sidecars: its ids are scanned
        os.remove(f"{train}.meta.json")
    with pytest.raises(ValueError, match=r"data.train_path: .* token id 700 but model.vocab_size=512"):
        prepare_data(_indexed_cfg(train, valid, tok), vocab_size=512)


def test_other_tokenizer_of_same_size_refused(tmp_path, tokenizers):
    tok_a, tok_b = tokenizers
    assert tok_a.identity != tok_b.identity
    train = _write(tmp_path / "train", _encoded(tok_a), VOCAB, tok_a)
    valid = _write(tmp_path / "valid", _encoded(tok_a, 5), VOCAB, tok_a)
    assert len(prepare_data(_indexed_cfg(train, valid, tok_a), vocab_size=512).train) == 40
    with pytest.raises(ValueError, match=rf"made with tokenizer a.model .* not with data.tokenizer="
                                         rf"{re.escape(tok_b.path)}.*set data.tokenizer"):
        prepare_data(_indexed_cfg(train, valid, tok_b), vocab_size=512)


def test_legacy_dataset_loads_with_warning(tmp_path, tokenizers, caplog, monkeypatch):
    monkeypatch.setattr(indexed, "_CHUNK", 7)  # the id scan crosses chunk boundaries
    tok = tokenizers[0]
    train = _write(tmp_path / "train", _encoded(tok), VOCAB, tok)
    valid = _write(tmp_path / "valid", _encoded(tok, 5), VOCAB, tok)
    for prefix in (train, valid):
        os.remove(f"{prefix}.meta.json")
    with caplog.at_level(logging.WARNING, logger="megads"):
        data = prepare_data(_indexed_cfg(train, valid, tok), vocab_size=512)
    assert len(data.train) == 40 and data.train.meta is None
    assert data.train.max_token_id() == max(max(d) for d in _encoded(tok))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "data.train_path" in warnings[0] and "data.valid_path" in warnings[1]
    assert all("records no tokenizer identity" in w and "tools/preprocess_data.py" in w for w in warnings)


# ---------------------------------------------------------------- damaged .idx / sidecar

@pytest.mark.parametrize("offsets, problem", [([0, 5, 3, 6], "out of order"), ([1, 3, 5, 6], "not 0")])
def test_bad_offsets_refused(tmp_path, monkeypatch, offsets, problem):
    monkeypatch.setattr(indexed, "_CHUNK", 1)  # the decrease lies across a chunk boundary
    prefix = _write(tmp_path / "ds", [[1, 2, 3], [4, 5], [6]], 100)
    idx = tmp_path / "ds.idx"
    idx.write_bytes(idx.read_bytes()[:32] + np.asarray(offsets, dtype="<i8").tobytes())
    with pytest.raises(ValueError, match=rf"{re.escape(str(idx))}: .*{problem}.*rebuild it"):
        IndexedDataset(prefix)


def test_sidecar_of_another_build_refused(tmp_path):
    prefix = _write(tmp_path / "ds", [[1, 2, 3], [4, 5]], 100)
    other = _write(tmp_path / "other", [[1, 2, 3]], 100)
    shutil.copy(f"{other}.meta.json", f"{prefix}.meta.json")
    with pytest.raises(ValueError, match=rf"{re.escape(prefix)}.meta.json: records 1 documents / 3 tokens"):
        IndexedDataset(prefix)


# ---------------------------------------------------------------- check_data_fits

def test_check_data_fits_synthetic(tmp_path):
    cfg = types.SimpleNamespace(source="synthetic", train_path=None, valid_path=None, tokenizer=None,
                                cache_dir=str(tmp_path), synthetic_docs=30, synthetic_valid_docs=1, seed=3)
    data = prepare_data(cfg, vocab_size=512)
    check_data_fits(data, cfg, seq_len=8, global_batch=4)
    with pytest.raises(ValueError, match=r"data.synthetic_docs=30: .* fewer than one global batch "
                                         r"\(train.global_batch=512\); raise data.synthetic_docs"):
        check_data_fits(data, cfg, seq_len=8, global_batch=512)
    with pytest.raises(ValueError, match=r"data.synthetic_valid_docs=1: .* 0 samples .* fewer than one sample"):
        check_data_fits(data, cfg, seq_len=200, global_batch=1)


def test_check_data_fits_indexed(tmp_path, tokenizers):
    tok = tokenizers[0]
    train = _write(tmp_path / "train", [[5] * 30], VOCAB, tok)  # 31 tokens with eos
    valid = _write(tmp_path / "valid", [[5] * 30], VOCAB, tok)
    cfg = _indexed_cfg(train, valid, tok)
    data = prepare_data(cfg, vocab_size=VOCAB)
    check_data_fits(data, cfg, seq_len=14, global_batch=2)  # 31 // 15 = 2 samples
    with pytest.raises(ValueError, match=rf"data.train_path={re.escape(repr(train))}: .* 2 samples .* "
                                         rf"point data.train_path at a larger dataset or lower train.seq_len"):
        check_data_fits(data, cfg, seq_len=14, global_batch=3)
