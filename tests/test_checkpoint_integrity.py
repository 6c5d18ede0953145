"""Checkpoint integrity: damage that keeps every file's size is detected before anything is
loaded, pieces must tile their tensors, trainer state is required to resume training, refusals
are one line and the same on every rank, a full disk leaves no half-written checkpoint behind,
and retention never deletes the checkpoint just written.

Each damage case edits a saved checkpoint the way the failure would (an overwritten float, flipped
bits, swapped safetensors keys, an edited index.json or trainer.pt) and expects a CheckpointError
whose one-line message names the file. The checkpoints come from the tiny single-process model of
tests/test_checkpoint.py, so each test takes about a second.
"""
import errno
import json
import os
import re
import shutil
import struct
import zipfile
from collections import namedtuple

import pytest
import torch

from distributed import run_ranks
from megads.checkpoint import CheckpointError, check_checkpoint_space, latest_checkpoint, load_checkpoint, \
    load_model_weights, save_checkpoint
from megads.checkpoint import format as checkpoint_format
from megads.checkpoint.convert import reshard
from megads.checkpoint.format import INDEX, TRAINER_STATE, CheckpointReader, Piece, PieceWriter, index_digest, \
    write_index
from megads.checkpoint.layout import model_pieces
from megads.parallel.mesh import Mesh
from test_checkpoint import tiny_model

PIECES = "rank00000-0.safetensors"        # the one piece file of a single-process save


def save(ckpt_dir, step=1, keep_last=2):
    """A training checkpoint of the tiny model after one update (its trainer state holds an RNG state)."""
    model, stepper = tiny_model()
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(step))
    model(tokens[:, :-1], tokens[:, 1:], 0.3).loss.backward()
    stepper.step()
    state = {"step": step, "rng": torch.get_rng_state()}
    return save_checkpoint(str(ckpt_dir), step, model, stepper, stepper.plan, state, keep_last,
                           {"model_config": model.cfg.__dict__})


def load(path, **options):
    model, stepper = tiny_model()
    return load_checkpoint(path, model, stepper, stepper.plan, **options), model, stepper


def refused(call, *names) -> str:
    """The message of the CheckpointError that `call` raises: one line naming every one of `names`."""
    with pytest.raises(CheckpointError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for name in names:
        assert name in message, f"{name!r} not named in: {message}"
    return message


def data_offset(path, key) -> int:
    """Where the bytes of tensor `key` start in a safetensors file."""
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
    return 8 + size + header[key]["data_offsets"][0]


def xor_bytes(path, offset, masks: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(len(masks))
        f.seek(offset)
        f.write(bytes(a ^ m for a, m in zip(old, masks)))


def edit_index(path, edit) -> None:
    """Edit index.json as a person or a faulty tool would: without updating its digest."""
    index_path = os.path.join(path, INDEX)
    with open(index_path) as f:
        index = json.load(f)
    edit(index)
    with open(index_path, "w") as f:
        json.dump(index, f, indent=1)


# ----------------------------------------------------------------------------- item 4: integrity

def test_overwritten_float_is_detected(tmp_path):
    path = save(tmp_path)
    file = os.path.join(path, PIECES)
    with open(file, "r+b") as f:
        f.seek(data_offset(file, "model.layers.1.mlp.experts.up_proj@0,0,0") + 5 * 4)
        f.write(struct.pack("<f", 1234.5))
    refused(lambda: load(path), file, "sha256", "model.embed_tokens.weight")


def test_sixteen_flipped_bits_are_detected(tmp_path):
    path = save(tmp_path)
    file = os.path.join(path, PIECES)
    xor_bytes(file, data_offset(file, "model.lm_head.weight@0,0"), bytes([0x01, 0x80]) * 8)
    refused(lambda: load_model_weights(path, tiny_model()[0]), file, "sha256")


def test_swapped_safetensors_keys_are_detected(tmp_path):
    """Two pieces of the same shape trade places in the header: same size, same shapes."""
    path = save(tmp_path)
    file = os.path.join(path, PIECES)
    a, b = (f'"model.layers.{i}.self_attn.o_proj.weight@0,0"'.encode() for i in (0, 1))
    with open(file, "rb") as f:
        data = f.read()
    end = 8 + struct.unpack("<Q", data[:8])[0]
    header = data[8:end]
    assert a in header and b in header and b"\0" not in header
    with open(file, "wb") as f:
        f.write(data[:8] + header.replace(a, b"\0").replace(b, a).replace(b"\0", b) + data[end:])
    refused(lambda: load(path), file, "sha256")


def test_edited_dtype_in_index_is_detected(tmp_path):
    path = save(tmp_path)
    edit_index(path, lambda index: index["tensors"]["model.lm_head.weight"].update(dtype="bfloat16"))
    refused(lambda: load(path), os.path.join(path, INDEX))


def test_adam_step_edited_to_zero_is_detected(tmp_path):
    """adam_step=0 would load the weights and silently drop the Adam moments."""
    path = save(tmp_path)
    edit_index(path, lambda index: index["metadata"].update(adam_step=0))
    refused(lambda: load(path), os.path.join(path, INDEX))


def test_flipped_bytes_in_trainer_state_are_detected(tmp_path):
    """Bytes of the RNG state inside trainer.pt: torch.load reads them without complaint."""
    path = save(tmp_path)
    file = os.path.join(path, TRAINER_STATE)
    with zipfile.ZipFile(file) as archive:
        storage = next(i for i in archive.infolist() if re.search(r"/data/\d+$", i.filename))
    with open(file, "rb") as f:
        f.seek(storage.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", f.read(4))
    xor_bytes(file, storage.header_offset + 30 + name_length + extra_length + 100, b"\xff" * 8)
    refused(lambda: load(path), file, "sha256", "checkpoint.weights_only=true")


def test_overlapping_pieces_with_a_gap_are_refused(tmp_path):
    """Rows [0, 2) and [1, 3) of a [4, 8] tensor: their sizes add up to the tensor's, yet row 1 is
    written twice and row 3 never. Refused when the index is written, and when an index that says
    so (from a faulty writer, self-consistent) is read."""
    writer = PieceWriter(str(tmp_path), "rank00000")
    for row in (0, 1):
        writer.add(Piece("model.embed_tokens.weight", (4, 8), (row, 0), torch.ones(2, 8)))
    writer.flush()
    expected = "tensor model.embed_tokens.weight"
    message = refused(lambda: write_index(str(tmp_path), writer.files, writer.tensors, {}), expected)
    assert "overlap at offset [1, 0] and no piece covers offset [3, 0]" in message
    index = {"format": "megads-checkpoint", "version": 2, "metadata": {}, "files": writer.files,
             "tensors": writer.tensors}
    with open(tmp_path / INDEX, "w") as f:
        json.dump({"index_sha256": index_digest(index), **index}, f)
    refused(lambda: CheckpointReader(str(tmp_path)), expected, INDEX, "overlap at offset [1, 0]")


def test_verify_false_skips_hashing_and_loads(tmp_path, monkeypatch):
    path = save(tmp_path)
    verified, expected, _ = load(path)
    hashed = []
    sha256 = checkpoint_format.file_sha256
    monkeypatch.setattr(checkpoint_format, "file_sha256", lambda file: hashed.append(file) or sha256(file))
    state, model, stepper = load(path, verify=False)
    assert hashed == [] and state["step"] == verified["step"] and torch.equal(state["rng"], verified["rng"])
    for (name, value), reference in zip(model.state_dict().items(), expected.state_dict().values()):
        assert torch.equal(value, reference), name
    assert all(int(s["step"]) == 1 for s in stepper.optimizer.state.values())
    load(path)
    assert sorted(map(os.path.basename, hashed)) == [PIECES, TRAINER_STATE]


# ----------------------------------------------------------------------------- item 5: trainer state

def test_missing_trainer_state_is_refused(tmp_path):
    path = save(tmp_path)
    os.remove(os.path.join(path, TRAINER_STATE))
    refused(lambda: load(path), path, TRAINER_STATE, "checkpoint.weights_only=true")
    refused(lambda: load(path, verify=False), path, TRAINER_STATE, "checkpoint.weights_only=true")


def test_weights_only_loads_weights_at_step_zero(tmp_path):
    path = save(tmp_path)
    os.remove(os.path.join(path, TRAINER_STATE))
    state, model, stepper = load(path, weights_only=True)
    assert state is None and not stepper.optimizer.state              # step 0, no Adam state
    reader = CheckpointReader(path)
    for name, value in model.state_dict().items():
        assert torch.equal(value, reader.read("model." + name)), name
    # A converted checkpoint records no trainer state: it loads as weights without being asked.
    converted = tmp_path / "converted"
    converted.mkdir()
    writer = PieceWriter(str(converted), "model")
    for piece in model_pieces(model, stepper.plan):
        writer.add(piece)
    writer.flush()
    write_index(str(converted), writer.files, writer.tensors, {"step": 0, "adam_step": 0})
    assert load(str(converted))[0] is None


# ----------------------------------------------------------------------------- item 11: refusals

def test_truncated_index_names_its_path(tmp_path):
    path = save(tmp_path)
    index_path = os.path.join(path, INDEX)
    with open(index_path, "r+b") as f:
        f.truncate(os.path.getsize(index_path) // 2)
    refused(lambda: load(path), index_path, "not readable JSON")


def _load_on_rank(rank, world_size, path):
    """Load `path` on this rank of a data-parallel run; the error message, or None."""
    model, stepper = tiny_model(mesh=Mesh(world_size=world_size, rank=rank, dp=world_size))
    try:
        load_checkpoint(path, model, stepper, stepper.plan)
    except CheckpointError as err:
        return str(err)
    return None


def test_damage_seen_by_one_rank_is_raised_on_every_rank(tmp_path):
    """Files are hashed by rank i % 2: the second of [tp000, tp001, trainer.pt] only by rank 1."""
    path = str(tmp_path / "tp2")
    reshard(save(tmp_path / "source"), path, tp=2, ep=1)
    assert sorted(CheckpointReader(path).files)[1] == "tp001-ep000-0.safetensors"
    file = os.path.join(path, "tp001-ep000-0.safetensors")
    xor_bytes(file, data_offset(file, "model.lm_head.weight@32,0"), b"\x10")
    messages = run_ranks(_load_on_rank, 2, args=(path,), timeout=120)
    assert messages[0] is not None and messages[0] == messages[1]
    assert file in messages[0] and "sha256" in messages[0] and "\n" not in messages[0]


# ----------------------------------------------------------------------------- item 13: disk space

Usage = namedtuple("Usage", "total used free")


def with_free_space(monkeypatch, free: int) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10 * free, 9 * free, free))


def test_space_check_counts_what_retention_frees(tmp_path, monkeypatch):
    """keep_last=2: three checkpoints' room is needed, of which existing checkpoints count as freed."""
    model, stepper = tiny_model()
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    one = weights + 2 * 4 * sum(p.numel() for p in model.parameters())       # + fp32 exp_avg, exp_avg_sq
    empty, used = str(tmp_path / "empty"), str(tmp_path / "used")
    save(used, 1)
    save(used, 2)
    with_free_space(monkeypatch, int(1.5 * one))
    check_checkpoint_space(used, model, stepper, stepper.plan, keep_last=2)
    message = refused(lambda: check_checkpoint_space(empty, model, stepper, stepper.plan, keep_last=2),
                      empty, "checkpoint.keep_last=2", "MiB more")
    assert re.search(r"free \d+\.\d MiB on that filesystem", message)
    with_free_space(monkeypatch, 4 * one)
    check_checkpoint_space(empty, model, stepper, stepper.plan, keep_last=2)
    with_free_space(monkeypatch, one // 2)             # the save itself checks that one more fits
    refused(lambda: save(used, 3), used, "step_00000002 is still the latest")
    assert sorted(os.listdir(used)) == ["latest", "step_00000001", "step_00000002"]


@pytest.mark.parametrize("failing", ["pieces", "index"])
def test_disk_full_while_saving_cleans_up(tmp_path, monkeypatch, failing):
    previous = save(tmp_path, 1)

    def full(tensors_or_path, path_or_text, **options):
        path = path_or_text if failing == "pieces" else tensors_or_path       # save_file(tensors, path, ...)
        with open(path, "wb") as f:
            f.write(b"\0" * 100)                       # half-written, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    monkeypatch.setattr(checkpoint_format, {"pieces": "save_file", "index": "write_atomic"}[failing], full)
    refused(lambda: save(tmp_path, 2), str(tmp_path), "no space left", "free", "step_00000001 is still the latest")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_00000001"]          # no step_00000002.tmp
    assert latest_checkpoint(str(tmp_path)) == previous
    assert load(str(tmp_path))[0]["step"] == 1


def _save_tp2_with_a_full_disk_on_rank_1(rank, world_size, ckpt_dir):
    """Save the tiny model under TP=2 (each rank writes its shards), the disk full for rank 1 only."""
    model, stepper = tiny_model(mesh=Mesh(world_size=world_size, rank=rank, tp=world_size))
    if rank == 1:
        checkpoint_format.save_file = _disk_full
    try:
        save_checkpoint(ckpt_dir, 2, model, stepper, stepper.plan, {"step": 2}, 2, {"model_config": model.cfg.__dict__})
    except CheckpointError as err:
        return str(err)
    return None


def _disk_full(tensors, path, **options):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def test_disk_full_on_one_rank_stops_every_rank(tmp_path):
    previous = save(tmp_path, 1)
    messages = run_ranks(_save_tp2_with_a_full_disk_on_rank_1, 2, args=(str(tmp_path),), timeout=120)
    assert messages[0] is not None and messages[0] == messages[1]
    assert "no space left" in messages[0] and "rank00001-0.safetensors" in messages[0]
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_00000001"]
    assert latest_checkpoint(str(tmp_path)) == previous


# ----------------------------------------------------------------------------- item 1: retention

def test_retention_keeps_the_checkpoint_just_written(tmp_path):
    """An earlier run saved steps 4 and 8 (interval 4); a new run in the same directory saves step
    3 with keep_last=2: step 3 survives and `latest` points to it."""
    for step in (4, 8, 3):
        written = save(tmp_path, step, keep_last=2)
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_00000003", "step_00000004", "step_00000008"]
    assert latest_checkpoint(str(tmp_path)) == written
    assert load(str(tmp_path))[0]["step"] == 3


def test_converter_refuses_a_damaged_checkpoint_with_one_line(tmp_path, capsys):
    """tools/convert_checkpoint.py: bad input is exit status 2 and one line, as for training."""
    import importlib
    convert_cli = importlib.import_module("tools.convert_checkpoint")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "index.json").write_text('{"format": "megads-checkpoint", "vers')
    assert convert_cli.main(["to-hf", str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("convert_checkpoint to-hf: error: ")
    assert str(tmp_path / "ckpt" / "index.json") in err and not (tmp_path / "out").exists()
