"""Tests for megads.data: synthetic corpus, tokenizer, indexed datasets, packing/loader, prepare, tools."""
from __future__ import annotations

import json
import multiprocessing
import os
import random
import re
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from megads.data import (
    BatchLoader,
    IndexedDataset,
    IndexedDatasetWriter,
    PackedSequences,
    SentencePieceTokenizer,
    extract_answer,
    format_ok,
    generate_documents,
    make_problem,
    prepare_data,
    train_tokenizer,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTION_RE = re.compile(r"Question: ([0-9+\-* ]+) = \?\n")
STEP_RE = re.compile(r"(\d+) ([+\-*]) (\d+) = (-?\d+)\.")


# ---------------------------------------------------------------- synthetic

def test_generate_documents_deterministic():
    a = generate_documents(1, 300)
    assert a == generate_documents(1, 300)
    assert a != generate_documents(2, 300)
    assert len(a) == 300
    n_filler = sum(not d.startswith("Question:") for d in a)
    assert 0.1 * 300 < n_filler < 0.3 * 300  # filler_fraction=0.2
    assert generate_documents(1, 50, filler_fraction=0.0)[0].startswith("Question:")
    assert all("\n\n" not in d and not d.endswith("\n") for d in a)


def _check_problem(prompt: str, response: str, answer: str) -> None:
    expr = QUESTION_RE.fullmatch(prompt).group(1)
    assert answer == str(eval(expr))  # plain Python reference
    think = re.fullmatch(r"<think>(.*)</think><answer>(.*)</answer>", response).group(1)
    steps = STEP_RE.findall(think)
    assert steps and " ".join(f"{a} {op} {b} = {c}." for a, op, b, c in steps) == think
    for a, op, b, c in steps:
        assert int(c) == eval(f"{a} {op} {b}") and int(c) >= 0
    assert steps[-1][3] == answer
    assert format_ok(response) and extract_answer(response) == answer


@pytest.mark.parametrize("tier", range(4))
def test_problems_are_correct(tier):
    rng = random.Random(tier)
    for _ in range(300):
        p = make_problem(rng, tier)
        assert p.tier == tier
        _check_problem(p.prompt, p.response, p.answer)
        n_ops = len(STEP_RE.findall(p.response))
        assert n_ops == {0: 1, 1: 1, 2: 2, 3: 3}[tier]
        if tier == 0:
            assert all(int(x) <= 99 for x in re.findall(r"\d+", p.prompt))


def test_problem_documents_are_correct():
    for doc in generate_documents(7, 500, filler_fraction=0.0):
        prompt, response = doc.split("\n", 1)
        _check_problem(prompt + "\n", response, extract_answer(response))


def test_make_problem_bad_tier():
    with pytest.raises(ValueError, match="tier"):
        make_problem(random.Random(0), 4)


def test_extract_answer_and_format_ok():
    good = "<think>25 * 3 = 75. 17 + 75 = 92.</think><answer>92</answer>"
    assert extract_answer(good) == "92" and format_ok(good)
    assert extract_answer("blah <answer> 7 </answer> <answer>8</answer>") == "7"
    assert format_ok(" <think></think>\n<answer>5</answer>\n")
    for bad in ["no tags", "<answer>12", "<answer></answer>", "<answer>  </answer>"]:
        assert extract_answer(bad) is None
    for bad in [
        "<answer>92</answer>",                                     # no think
        "<think>x</think>",                                        # no answer
        "<think>x<answer>92</answer>",                             # think unclosed
        "<think>x</think><answer>92",                              # answer unclosed
        "<answer>92</answer><think>x</think>",                     # wrong order
        "<think>x</think><answer></answer>",                       # empty answer
        "<think>a<think>b</think><answer>1</answer>",              # nested tag
        "<think>x</think><answer>1</answer><answer>2</answer>",    # extra answer
        "Sure! <think>x</think><answer>1</answer>",                # text outside
    ]:
        assert not format_ok(bad), bad


# ---------------------------------------------------------------- tokenizer

@pytest.fixture(scope="module")
def corpus_docs():
    return generate_documents(0, 3000)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, corpus_docs):
    d = tmp_path_factory.mktemp("tok")
    corpus = d / "corpus.txt"
    corpus.write_text("\n\n".join(corpus_docs) + "\n", encoding="utf-8")
    return SentencePieceTokenizer(train_tokenizer([str(corpus)], str(d / "tok"), 512))


def test_tokenizer_round_trip(tokenizer, corpus_docs):
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 2, 3)
    assert 300 < tokenizer.vocab_size <= 512
    text = "\n\n".join(corpus_docs[:200]) + "\n"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    for doc in corpus_docs[:500] + ["  two  spaces\n\n\ttab\n", "unseen: é 漢 ✓", " lead", "trail "]:
        assert tokenizer.decode(tokenizer.encode(doc)) == doc
    ids = tokenizer.encode("x", bos=True, eos=True)
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id


def test_tokenizer_tags_are_single_tokens(tokenizer):
    doc = "Question: 1 + 2 = ?\n<think>1 + 2 = 3.</think><answer>3</answer>"
    ids = tokenizer.encode(doc)
    for tag in ["<think>", "</think>", "<answer>", "</answer>"]:
        tag_id = tokenizer.token_to_id(tag)
        assert tokenizer.encode(tag) == [tag_id]
        assert ids.count(tag_id) == 1
    assert tokenizer.encode("12") == [tokenizer.token_to_id("1"), tokenizer.token_to_id("2")]  # split digits


def test_tokenizer_missing_file(tmp_path):
    missing = str(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        SentencePieceTokenizer(missing)


# ---------------------------------------------------------------- indexed

def _write(prefix, docs, vocab_size):
    w = IndexedDatasetWriter(str(prefix), vocab_size)
    for d in docs:
        w.add_document(d)
    w.finalize()
    return IndexedDataset(str(prefix))


@pytest.mark.parametrize("vocab_size,dtype", [(1000, np.uint16), (70000, np.int32)])
def test_indexed_round_trip(tmp_path, vocab_size, dtype):
    rng = random.Random(0)
    docs = [[rng.randrange(vocab_size) for _ in range(rng.randint(0, 30))] for _ in range(50)]
    docs[3] = [vocab_size - 1, 0]
    ds = _write(tmp_path / "ds", docs, vocab_size)
    assert ds.dtype == dtype and len(ds) == 50
    flat = [t for d in docs for t in d]
    assert ds.num_tokens == len(flat)
    for i, d in enumerate(docs):
        assert ds[i].tolist() == d
    assert ds.tokens(17, 40).tolist() == flat[17:57]
    with pytest.raises(IndexError):
        ds[50]
    with pytest.raises(IndexError):
        ds.tokens(len(flat) - 1, 2)
    assert sorted(os.listdir(tmp_path)) == ["ds.bin", "ds.idx", "ds.meta.json"]  # no tmp leftovers
    assert ds.meta == {"tokenizer_sha256": None, "tokenizer": None, "vocab_size": vocab_size,
                       "max_token_id": max(flat), "documents": 50, "tokens": len(flat)}


def test_indexed_errors(tmp_path):
    with IndexedDatasetWriter(str(tmp_path / "x"), 100) as writer, pytest.raises(ValueError, match="out of range"):
        writer.add_document([100])
    assert os.listdir(tmp_path) == []  # left without finalize: its .tmp file is gone
    _write(tmp_path / "ds", [[1, 2, 3], [4, 5]], 100)
    bin_path, idx_path = tmp_path / "ds.bin", tmp_path / "ds.idx"

    bin_bytes = bin_path.read_bytes()
    bin_path.write_bytes(bin_bytes[:-2])  # truncated: one token short
    with pytest.raises(ValueError, match=re.escape(str(bin_path))):
        IndexedDataset(str(tmp_path / "ds"))
    bin_path.write_bytes(bin_bytes)

    idx_bytes = idx_path.read_bytes()
    idx_path.write_bytes(b"NOTMAGIC" + idx_bytes[8:])
    with pytest.raises(ValueError, match="magic"):
        IndexedDataset(str(tmp_path / "ds"))
    idx_path.write_bytes(idx_bytes[:-8])
    with pytest.raises(ValueError, match=re.escape(str(idx_path))):
        IndexedDataset(str(tmp_path / "ds"))

    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.idx"))):
        IndexedDataset(str(tmp_path / "nope"))


# ---------------------------------------------------------------- packing / loader

EOS = 3


@pytest.fixture
def small_ds(tmp_path):
    rng = random.Random(1)
    docs = [[rng.randrange(4, 100) for _ in range(rng.randint(0, 12))] for _ in range(40)]
    return docs, _write(tmp_path / "small", docs, 100)


def _reference_samples(docs, seq_len, seed, epoch):
    """Plain-Python packing of one epoch."""
    order = np.random.default_rng(seed + epoch).permutation(len(docs)).tolist()
    stream = []
    for d in order:
        stream += docs[d] + [EOS]
    n = seq_len + 1
    return [stream[j * n : (j + 1) * n] for j in range(len(stream) // n)]


def test_packed_sequences_match_reference(small_ds):
    docs, ds = small_ds
    seqs = PackedSequences(ds, seq_len=7, seed=5, eos_id=EOS)
    ref = [s for e in range(3) for s in _reference_samples(docs, 7, 5, e)]
    assert seqs.samples_per_epoch == len(_reference_samples(docs, 7, 5, 0))
    got = [seqs[i] for i in range(len(ref))]
    assert all(g.dtype == torch.int64 and g.shape == (8,) for g in got)
    assert [g.tolist() for g in got] == ref
    # random access order (epoch cache switching) does not matter
    for i in random.Random(0).sample(range(len(ref)), 60):
        assert seqs[i].tolist() == ref[i]


def test_packed_sequences_epochs_and_determinism(small_ds):
    _, ds = small_ds
    a = PackedSequences(ds, seq_len=7, seed=5, eos_id=EOS)
    n = a.samples_per_epoch
    epoch0 = [a[i].tolist() for i in range(n)]
    epoch1 = [a[n + i].tolist() for i in range(n)]
    assert epoch0 != epoch1
    b = PackedSequences(ds, seq_len=7, seed=5, eos_id=EOS)
    assert [b[i].tolist() for i in range(n)] == epoch0
    c = PackedSequences(ds, seq_len=7, seed=6, eos_id=EOS)
    assert [c[i].tolist() for i in range(n)] != epoch0


def test_packed_sequences_too_short(tmp_path):
    ds = _write(tmp_path / "tiny", [[5, 6], [7]], 100)  # 5 tokens with eos
    PackedSequences(ds, seq_len=4, seed=0, eos_id=EOS)
    with pytest.raises(ValueError, match="shorter than one sample"):
        PackedSequences(ds, seq_len=5, seed=0, eos_id=EOS)


@pytest.mark.parametrize("dp_size", [1, 2, 4])
def test_batch_loader_shards_global_batch(small_ds, dp_size):
    _, ds = small_ds
    seqs = PackedSequences(ds, seq_len=7, seed=5, eos_id=EOS)
    loaders = [BatchLoader(seqs, global_batch=8, micro_batch=2, dp_rank=r, dp_size=dp_size) for r in range(dp_size)]
    for step in range(5):  # crosses epoch boundaries (samples_per_epoch is small)
        parts = []
        for loader in loaders:
            micro = loader.next_step()
            assert len(micro) == 8 // (2 * dp_size)
            assert all(m.shape == (2, 8) and m.dtype == torch.int64 for m in micro)
            parts += micro
        expected = torch.stack([seqs[step * 8 + k] for k in range(8)])
        assert torch.equal(torch.cat(parts), expected)
    assert all(loader.consumed_samples == 40 for loader in loaders)


def test_batch_loader_resume(small_ds):
    _, ds = small_ds
    seqs = PackedSequences(ds, seq_len=7, seed=5, eos_id=EOS)
    uninterrupted = BatchLoader(seqs, 8, 2, dp_rank=1, dp_size=2)
    steps = [uninterrupted.next_step() for _ in range(5)]

    first = BatchLoader(seqs, 8, 2, dp_rank=1, dp_size=2)
    for _ in range(3):
        first.next_step()
    sd = first.state_dict()
    assert sd["consumed_samples"] == 24

    fresh_seqs = PackedSequences(ds, seq_len=7, seed=5, eos_id=EOS)
    resumed = BatchLoader(fresh_seqs, 8, 2, dp_rank=1, dp_size=2)
    resumed.load_state_dict(sd)
    for expected in steps[3:]:
        got = resumed.next_step()
        assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))

    other_seed = BatchLoader(PackedSequences(ds, seq_len=7, seed=6, eos_id=EOS), 8, 2)
    with pytest.raises(ValueError, match="seed"):
        other_seed.load_state_dict(sd)


def test_batch_loader_divisibility_error(small_ds):
    _, ds = small_ds
    seqs = PackedSequences(ds, seq_len=7, seed=5, eos_id=EOS)
    with pytest.raises(ValueError, match=r"global_batch=10 is not divisible by dp_size\*micro_batch=2\*4=8"):
        BatchLoader(seqs, global_batch=10, micro_batch=4, dp_size=2)
    with pytest.raises(ValueError, match="dp_rank"):
        BatchLoader(seqs, global_batch=8, micro_batch=4, dp_rank=2, dp_size=2)


# ---------------------------------------------------------------- prepare_data

def _cfg(**kw):
    base = dict(source="synthetic", train_path=None, valid_path=None, tokenizer=None, cache_dir=".megads_cache",
                synthetic_docs=600, synthetic_valid_docs=60, seed=11)
    base.update(kw)
    return types.SimpleNamespace(**base)


def _mtimes(path):
    return {f: os.stat(os.path.join(path, f)).st_mtime_ns for f in sorted(os.listdir(path))}


def test_prepare_synthetic_builds_once(tmp_path):
    cfg = _cfg(cache_dir=str(tmp_path))
    data = prepare_data(cfg, vocab_size=512)
    build = tmp_path / "synthetic-s11-n600-v60-V512"
    assert build.is_dir() and not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    before = _mtimes(build)
    assert {"corpus.txt", "tokenizer.model", "train.bin", "train.idx", "train.meta.json", "valid.bin", "valid.idx",
            "valid.meta.json"} <= set(before)
    assert data.train.meta["tokenizer_sha256"] == data.tokenizer.identity

    assert len(data.train) == 600 and len(data.valid) == 60
    assert data.tokenizer.vocab_size <= 512
    train_docs = generate_documents(11, 600)
    assert [data.tokenizer.decode(data.train[i]) for i in range(600)] == train_docs
    valid_docs = {data.tokenizer.decode(data.valid[i]) for i in range(60)}
    assert not valid_docs & set(train_docs)  # held out

    again = prepare_data(cfg, vocab_size=512)
    assert _mtimes(build) == before
    assert np.array_equal(again.train.tokens(0, again.train.num_tokens), data.train.tokens(0, data.train.num_tokens))


def _prepare_in_child(cache_dir, queue):
    data = prepare_data(_cfg(cache_dir=cache_dir, seed=12), vocab_size=400)
    queue.put(data.train.num_tokens)


def test_prepare_synthetic_concurrent(tmp_path):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_prepare_in_child, args=(str(tmp_path), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    counts = {queue.get(timeout=5) for _ in procs}
    assert len(counts) == 1
    assert sorted(os.listdir(tmp_path)) == ["synthetic-s12-n600-v60-V400", "synthetic-s12-n600-v60-V400.lock"]


def test_prepare_indexed(tmp_path):
    built = prepare_data(_cfg(cache_dir=str(tmp_path)), vocab_size=512)
    root = tmp_path / "synthetic-s11-n600-v60-V512"
    cfg = _cfg(source="indexed", train_path=str(root / "train"), valid_path=str(root / "valid"),
               tokenizer=str(root / "tokenizer.model"))
    data = prepare_data(cfg, vocab_size=512)
    assert len(data.train) == len(built.train) and data.valid.num_tokens == built.valid.num_tokens

    missing = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=f"data.train_path.*{re.escape(missing)}"):
        prepare_data(_cfg(**{**vars(cfg), "train_path": missing}), vocab_size=512)
    with pytest.raises(ValueError, match="data.valid_path"):
        prepare_data(_cfg(**{**vars(cfg), "valid_path": None}), vocab_size=512)
    with pytest.raises(ValueError, match="model.vocab_size=300"):
        prepare_data(cfg, vocab_size=300)
    with pytest.raises(ValueError, match="data.source"):
        prepare_data(_cfg(source="webtext"), vocab_size=512)


# ---------------------------------------------------------------- tools

def _run_tool(script, *args):
    env = {**os.environ, "PYTHONPATH": REPO}
    res = subprocess.run([sys.executable, os.path.join(REPO, "tools", script), *map(str, args)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_tools_end_to_end(tmp_path):
    docs = generate_documents(3, 400)
    txt = tmp_path / "corpus.txt"
    txt.write_text("\n\n".join(docs) + "\n\n\n", encoding="utf-8")
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps({"content": d}) + "\n" for d in docs[:50]), encoding="utf-8")

    out = _run_tool("train_tokenizer.py", "--input", txt, "--output-prefix", tmp_path / "tok", "--vocab-size", 400)
    assert "vocab_size=" in out
    tok = SentencePieceTokenizer(str(tmp_path / "tok.model"))

    out = _run_tool("preprocess_data.py", "--input", txt, "--tokenizer", tmp_path / "tok.model",
                    "--output-prefix", tmp_path / "txt", "--log-interval", 100)
    assert "processed 400 documents" in out and "400 documents" in out.splitlines()[-1]
    ds = IndexedDataset(str(tmp_path / "txt"))
    assert [tok.decode(ds[i]) for i in range(len(ds))] == docs
    assert (ds.meta["tokenizer_sha256"], ds.meta["tokenizer"]) == (tok.identity, "tok.model")

    _run_tool("preprocess_data.py", "--input", jsonl, "--json-key", "content", "--tokenizer", tmp_path / "tok.model",
              "--output-prefix", tmp_path / "js", "--append-eos")
    ds = IndexedDataset(str(tmp_path / "js"))
    assert len(ds) == 50
    assert ds[7].tolist() == tok.encode(docs[7], eos=True)
