"""Tokenizers: one interface over HuggingFace tokenizer.json and sentencepiece .model files.

A small byte-level BPE tokenizer.json is trained here with the `tokenizers` library (DeepSeek-V3's
bos / eos names, <think> and </think> as special tokens, a post-processor that adds bos, which
megads must not apply). `load_tokenizer` picks the kind by file; text round-trips; bos / eos / pad
come from tokenizer_config.json or common names; `special_id` names the file when a token is
missing; preprocess_data.py records a tokenizer.json's identity and training refuses a dataset of
the other tokenizer; convert_checkpoint.py carries the tokenizer files both ways."""
from __future__ import annotations

import dataclasses
import filecmp
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import types

import pytest
import torch
from tokenizers import Tokenizer as LibraryTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from megads.checkpoint import CheckpointError, CheckpointReader, load_model_weights, save_checkpoint
from megads.checkpoint.convert import from_hf, reshard, to_hf
from megads.data import (
    HuggingFaceTokenizer,
    IndexedDataset,
    IndexedDatasetWriter,
    SentencePieceTokenizer,
    generate_documents,
    load_tokenizer,
    prepare_data,
    train_tokenizer,
)
from megads.model.deepseek_v3 import DeepSeekV3
from megads.parallel.plan import whole_model_plan
from test_data_integrity import _assert_refused, _preprocess
from test_hf_conversion import CONFIG, NoOptimizer

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
TEXTS = ["Question: 12 + 30 = ?\n<think>12 + 30 = 42.</think><answer>42</answer>", "  two  spaces\n\n\ttab\n",
         "unseen: é 漢 ✓ 🙂", " lead", "trail ", ""]
MODEL_CONFIG = dataclasses.replace(CONFIG, vocab_size=512)      # room for either test tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def train_hf(docs: list[str], special_tokens: list[str], vocab_size: int = 400) -> LibraryTokenizer:
    tokenizer = LibraryTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                            show_progress=False))
    return tokenizer


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A directory holding only a tokenizer.json (no tokenizer_config.json)."""
    directory = tmp_path_factory.mktemp("hf_tok")
    tokenizer = train_hf(generate_documents(0, 500), [BOS, EOS, "<think>", "</think>"])
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 0)])
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sp_tok")
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(generate_documents(1, 300)) + "\n", encoding="utf-8")
    train_tokenizer([str(corpus)], str(directory / "tokenizer"), 320)
    os.remove(corpus)
    return directory


def with_config(hf_dir, target, config: dict) -> str:
    """A copy of the tokenizer.json into `target` with a tokenizer_config.json; the copy's path."""
    target.mkdir()
    shutil.copy(hf_dir / "tokenizer.json", target / "tokenizer.json")
    (target / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return str(target / "tokenizer.json")


# ---------------------------------------------------------------- load_tokenizer

def test_load_tokenizer_picks_the_kind_by_file(hf_dir, sp_dir):
    for path in (hf_dir / "tokenizer.json", hf_dir):
        tokenizer = load_tokenizer(str(path))
        assert isinstance(tokenizer, HuggingFaceTokenizer) and tokenizer.path == str(hf_dir / "tokenizer.json")
    for path in (sp_dir / "tokenizer.model", sp_dir):
        tokenizer = load_tokenizer(str(path))
        assert isinstance(tokenizer, SentencePieceTokenizer) and tokenizer.path == str(sp_dir / "tokenizer.model")
    assert load_tokenizer(str(hf_dir)).identity != load_tokenizer(str(sp_dir)).identity


def test_load_tokenizer_refuses_what_is_not_a_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"tokenizer {tmp_path / 'nope.json'} does not exist; give")):
        load_tokenizer(str(tmp_path / "nope.json"))
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path} holds neither tokenizer.json nor tokenizer.model")):
        load_tokenizer(str(tmp_path))
    (tmp_path / "vocab.txt").write_text("a\n")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'vocab.txt'} is neither a .json nor a .model file")):
        load_tokenizer(str(tmp_path / "vocab.txt"))
    (tmp_path / "tokenizer.json").write_text('{"truncated": ')
    with pytest.raises(ValueError, match=re.escape(f"cannot load HuggingFace tokenizer {tmp_path / 'tokenizer.json'}:")):
        load_tokenizer(str(tmp_path))


# ---------------------------------------------------------------- encoding

def test_round_trip_and_no_special_tokens_unless_asked(hf_dir):
    tokenizer = load_tokenizer(str(hf_dir))
    docs = generate_documents(7, 200) + TEXTS
    assert [tokenizer.decode(tokenizer.encode(doc)) for doc in docs] == docs
    assert tokenizer.encode_batch(docs) == [tokenizer.encode(doc) for doc in docs]
    assert tokenizer.bos_id not in tokenizer.encode("1 + 2")                      # the post-processor is not applied
    ids = tokenizer.encode("1 + 2", bos=True, eos=True)
    assert ids == [tokenizer.bos_id] + tokenizer.encode("1 + 2") + [tokenizer.eos_id]


def test_special_tokens_by_common_names(hf_dir):
    tokenizer = load_tokenizer(str(hf_dir))
    library = LibraryTokenizer.from_file(str(hf_dir / "tokenizer.json"))
    assert (tokenizer.bos_id, tokenizer.eos_id) == (library.token_to_id(BOS), library.token_to_id(EOS))
    assert tokenizer.pad_id == tokenizer.eos_id                                    # no pad token: eos, as sentencepiece
    assert tokenizer.vocab_size == library.get_vocab_size(with_added_tokens=True)
    think = tokenizer.special_id("<think>")
    assert tokenizer.encode("<think>") == [think] and tokenizer.special_id("</think>") != think
    with pytest.raises(ValueError, match=re.escape(f"tokenizer {hf_dir / 'tokenizer.json'} has no token '<answer>'; "
                                                   f"use a tokenizer that holds it")):
        tokenizer.special_id("<answer>")


def test_special_tokens_from_tokenizer_config(hf_dir, tmp_path):
    path = with_config(hf_dir, tmp_path / "configured", {"eos_token": {"__type": "AddedToken", "content": "</think>"},
                                                         "pad_token": "<think>", "bos_token": None})
    tokenizer = load_tokenizer(path)
    assert (tokenizer.eos_id, tokenizer.pad_id) == (tokenizer.special_id("</think>"), tokenizer.special_id("<think>"))
    assert tokenizer.bos_id == tokenizer.special_id(BOS)                           # null: found by its common name
    config = tmp_path / "unknown" / "tokenizer_config.json"
    with pytest.raises(ValueError, match=re.escape(f"{config}: eos_token '<nope>' is not a token of ")):
        load_tokenizer(with_config(hf_dir, tmp_path / "unknown", {"eos_token": "<nope>"}))


def test_tokenizer_without_eos_is_refused(tmp_path):
    train_hf(generate_documents(0, 50), ["<think>"], vocab_size=300).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=re.escape(f"tokenizer {tmp_path / 'tokenizer.json'} has no eos token") +
                       ".*set eos_token there"):
        load_tokenizer(str(tmp_path))


def test_sentencepiece_special_ids(sp_dir):
    tokenizer = load_tokenizer(str(sp_dir))
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 2, 3)
    assert [tokenizer.special_id(t) for t in ("<think>", "</think>")] == [tokenizer.token_to_id("<think>"),
                                                                         tokenizer.token_to_id("</think>")]
    assert tokenizer.token_to_id("<nope>") == 1                                    # unk, as before
    with pytest.raises(ValueError, match=re.escape(f"tokenizer {sp_dir / 'tokenizer.model'} has no token '<nope>'")):
        tokenizer.special_id("<nope>")
    docs = generate_documents(7, 50) + TEXTS
    assert [tokenizer.decode(tokenizer.encode(doc)) for doc in docs] == docs


def test_same_ids_as_transformers(hf_dir):
    from transformers import PreTrainedTokenizerFast
    theirs = PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"))
    ours = load_tokenizer(str(hf_dir))
    for text in TEXTS + generate_documents(3, 5):
        ids = theirs.encode(text, add_special_tokens=False)
        assert ours.encode(text) == ids and ours.decode(ids) == theirs.decode(ids), text


# ---------------------------------------------------------------- datasets

def indexed_cfg(train: str, valid: str, tokenizer: str) -> types.SimpleNamespace:
    return types.SimpleNamespace(source="indexed", train_path=train, valid_path=valid, tokenizer=tokenizer,
                                 cache_dir=".megads_cache", synthetic_docs=0, synthetic_valid_docs=0, seed=0)


def test_preprocess_records_tokenizer_json_and_training_checks_it(hf_dir, sp_dir, tmp_path):
    docs = generate_documents(4, 60)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    for split in ("train", "valid"):
        res = _preprocess("--input", corpus, "--tokenizer", hf_dir / "tokenizer.json", "--output-prefix", tmp_path / split)
        assert res.returncode == 0, res.stderr
    hf, sp = load_tokenizer(str(hf_dir)), load_tokenizer(str(sp_dir))
    dataset = IndexedDataset(str(tmp_path / "train"))
    assert (dataset.meta["tokenizer_sha256"], dataset.meta["tokenizer"]) == (hf.identity, "tokenizer.json")
    assert [hf.decode(dataset[i]) for i in range(len(dataset))] == docs
    prefixes = str(tmp_path / "train"), str(tmp_path / "valid")
    assert prepare_data(indexed_cfg(*prefixes, str(hf_dir)), vocab_size=512).tokenizer.identity == hf.identity
    with pytest.raises(ValueError, match=rf"data.train_path: dataset .* was made with tokenizer tokenizer.json .* not "
                                         rf"with data.tokenizer={re.escape(sp.path)} .*; set data.tokenizer"):
        prepare_data(indexed_cfg(*prefixes, str(sp_dir / "tokenizer.model")), vocab_size=512)
    with pytest.raises(ValueError, match=rf"data.tokenizer: tokenizer {re.escape(hf.path)} has {hf.vocab_size} tokens "
                                         rf"but model.vocab_size=300"):
        prepare_data(indexed_cfg(*prefixes, str(hf_dir)), vocab_size=300)


def test_sentencepiece_dataset_refused_with_tokenizer_json(hf_dir, sp_dir, tmp_path):
    sp = load_tokenizer(str(sp_dir))
    for split in ("train", "valid"):
        with IndexedDatasetWriter(str(tmp_path / split), sp.vocab_size, tokenizer_sha256=sp.identity,
                                  tokenizer_name="tokenizer.model") as writer:
            for ids in sp.encode_batch(generate_documents(5, 20)):
                writer.add_document(ids)
            writer.finalize()
    with pytest.raises(ValueError, match=rf"made with tokenizer tokenizer.model .* not with data.tokenizer="
                                         rf"{re.escape(str(hf_dir / 'tokenizer.json'))} "):
        prepare_data(indexed_cfg(str(tmp_path / "train"), str(tmp_path / "valid"), str(hf_dir / "tokenizer.json")),
                     vocab_size=512)


def test_preprocess_refuses_a_directory_without_tokenizer(tmp_path):
    (tmp_path / "corpus.txt").write_text("a document\n", encoding="utf-8")
    (tmp_path / "empty").mkdir()
    res = _preprocess("--input", tmp_path / "corpus.txt", "--tokenizer", tmp_path / "empty",
                      "--output-prefix", tmp_path / "out/ds")
    _assert_refused(res, tmp_path / "out", f"{tmp_path / 'empty'} holds neither tokenizer.json nor tokenizer.model",
                    "check --tokenizer")


# ---------------------------------------------------------------- checkpoint conversion

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A megads checkpoint of a small model (as trained: no tokenizer files)."""
    torch.manual_seed(0)
    model = DeepSeekV3(MODEL_CONFIG)
    model.init_weights()
    root = tmp_path_factory.mktemp("ckpt")
    return save_checkpoint(str(root / "megads"), 3, model, NoOptimizer(), whole_model_plan(model), {"step": 3},
                           keep_last=1, metadata={"model_config": dataclasses.asdict(MODEL_CONFIG)})


def convert(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/convert_checkpoint.py", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def add_tokenizer(hf_out, hf_dir, sp_dir) -> None:
    """The four tokenizer files of a HuggingFace directory, into `hf_out`."""
    shutil.copy(hf_dir / "tokenizer.json", hf_out)
    shutil.copy(sp_dir / "tokenizer.model", hf_out)
    (hf_out / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS, "bos_token": BOS}), encoding="utf-8")
    (hf_out / "special_tokens_map.json").write_text(json.dumps({"eos_token": EOS}), encoding="utf-8")


def test_conversion_carries_the_tokenizer_both_ways(checkpoint, hf_dir, sp_dir, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="megads"):
        assert to_hf(checkpoint, str(tmp_path / "hf"))["tokenizer_files"] == 0
    assert "carries no tokenizer" in caplog.text and "--tokenizer" in caplog.text
    add_tokenizer(tmp_path / "hf", hf_dir, sp_dir)
    res = convert("from-hf", tmp_path / "hf", tmp_path / "back")
    assert res.returncode == 0 and "tokenizer_files=4" in res.stdout, res.stderr
    reader = CheckpointReader(str(tmp_path / "back"))
    for name in TOKENIZER_FILES:
        assert filecmp.cmp(tmp_path / "hf" / name, tmp_path / "back" / "tokenizer" / name, shallow=False), name
        assert reader.file_problem(f"tokenizer/{name}") is None                  # listed with its sha256
    assert load_tokenizer(str(tmp_path / "back" / "tokenizer")).identity == load_tokenizer(str(hf_dir)).identity
    load_model_weights(str(tmp_path / "back"), DeepSeekV3(MODEL_CONFIG))          # verification is unaffected

    assert to_hf(str(tmp_path / "back"), str(tmp_path / "again"))["tokenizer_files"] == 4
    names = sorted(os.listdir(tmp_path / "hf"))
    assert sorted(os.listdir(tmp_path / "again")) == names
    assert filecmp.cmpfiles(tmp_path / "hf", tmp_path / "again", names, shallow=False)[0] == names
    reshard(str(tmp_path / "back"), str(tmp_path / "cut"), tp=2, ep=2)
    assert sorted(os.listdir(tmp_path / "cut" / "tokenizer")) == sorted(TOKENIZER_FILES)


def test_damaged_tokenizer_file_is_not_carried_on(checkpoint, hf_dir, sp_dir, tmp_path):
    to_hf(checkpoint, str(tmp_path / "hf"))
    add_tokenizer(tmp_path / "hf", hf_dir, sp_dir)
    from_hf(str(tmp_path / "hf"), str(tmp_path / "back"))
    damaged = tmp_path / "back" / "tokenizer" / "tokenizer_config.json"
    damaged.write_text(damaged.read_text().replace("begin", "BEGIN"), encoding="utf-8")
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint file {damaged} is damaged") +
                       ".*it holds the tokenizer"):
        to_hf(str(tmp_path / "back"), str(tmp_path / "again"))
    assert not os.path.exists(tmp_path / "again")


def test_to_hf_copies_a_named_tokenizer(checkpoint, hf_dir, sp_dir, tmp_path):
    configured = with_config(hf_dir, tmp_path / "configured", {"eos_token": EOS})
    res = convert("to-hf", checkpoint, tmp_path / "hf", "--tokenizer", configured)
    assert res.returncode == 0 and "tokenizer_files=2" in res.stdout, res.stderr
    assert filecmp.cmp(configured, tmp_path / "hf" / "tokenizer.json", shallow=False)
    assert filecmp.cmp(tmp_path / "configured" / "tokenizer_config.json", tmp_path / "hf" / "tokenizer_config.json")
    assert to_hf(checkpoint, str(tmp_path / "sp"), tokenizer=str(sp_dir / "tokenizer.model"))["tokenizer_files"] == 1
    assert os.listdir(tmp_path / "sp").count("tokenizer.model") == 1

    big = LibraryTokenizer.from_file(str(hf_dir / "tokenizer.json"))
    big.add_tokens([f"<extra_{i}>" for i in range(200)])
    (tmp_path / "big").mkdir()
    big.save(str(tmp_path / "big" / "tokenizer.json"))
    res = convert("to-hf", checkpoint, tmp_path / "hf-big", "--tokenizer", tmp_path / "big")
    err = res.stderr.strip()
    assert res.returncode == 2 and len(err.splitlines()) == 1 and not os.path.exists(tmp_path / "hf-big"), err
    assert f"tokenizer {tmp_path / 'big' / 'tokenizer.json'} has {big.get_vocab_size()} tokens but the checkpoint's " \
           f"model has vocab_size=512" in err
