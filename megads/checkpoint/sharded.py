"""Saving and loading training checkpoints under any parallel layout (the one save path).

A checkpoint is `step_XXXXXXXX/` in the checkpoint directory, in the format of
`checkpoint/format.py`: the model's tensors (`model.<single-process name>`, router biases
included) and the AdamW moments (`optimizer.exp_avg.<name>`, `optimizer.exp_avg_sq.<name>`),
each with its global shape, plus `trainer.pt` (step, data position, RNG states, config).

Saving (collective over all ranks): every rank lists the pieces it holds; a piece held by
several ranks (replicas) is written by the lowest of them. Rank 0 first checks that the
checkpoint fits on the disk; ranks write their files into `step_XXXXXXXX.tmp/`; rank 0 then
writes the index, renames the directory, points `latest` at it and deletes checkpoints older
than it beyond `keep_last`. A directory named `step_*` is therefore always complete; a failed
write on any rank (disk full) removes the `.tmp` and raises the same `CheckpointError` on
every rank, leaving `latest` and the earlier checkpoints as they were.

Loading: first `open_checkpoint` checks the checkpoint, collectively, before any tensor is
used: the index and the tiling of its pieces, the model tensors against the config, the
presence of trainer state, and each file's sha256 (files split over the ranks). A problem
found by any rank is raised as the same `CheckpointError` on every rank. Then every local
tensor reads exactly its region of the global tensor, so a checkpoint written under any
(DP, PP, TP, EP, schedule) loads under any other.
"""
from __future__ import annotations

import dataclasses
import errno
import io
import logging
import os
import re
import shutil
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from megads.checkpoint import optimizer as adam
from megads.checkpoint.format import TRAINER_FIX, TRAINER_STATE, CheckpointError, CheckpointReader, PieceWriter, \
    first_names, merge_indexes, one_line, write_atomic, write_bytes, write_index
from megads.checkpoint.layout import MODEL, MOMENTS, expected_tensors, model_pieces, model_tensors, moment_name, \
    moment_piece, placement
from megads.config import ModelConfig
from megads.model.deepseek_v3 import DeepSeekV3
from megads.parallel.mesh import Mesh
from megads.parallel.plan import ParallelPlan, whole_model_plan

log = logging.getLogger("megads")
_STEP_DIR = re.compile(r"^step_(\d{8})$")
MOMENT_BYTES = 4          # AdamW moments are fp32 (torch AdamW on fp32 master weights, DeepSpeed's partitions)
T = TypeVar("T")


def _all_gather(obj, mesh: Mesh) -> list:
    if mesh.world_size == 1:
        return [obj]
    out = [None] * mesh.world_size
    dist.all_gather_object(out, obj)
    return out


def _agree(mesh: Mesh, work: Callable[[], T]) -> T:
    """Run `work` on every rank; if it raised a CheckpointError on any rank, raise the first of
    them (by rank) on every rank, so that all stop with the same message and none waits in a
    later collective."""
    result, message = None, None
    try:
        result = work()
    except CheckpointError as err:
        message = str(err)
    failed = [m for m in _all_gather(message, mesh) if m is not None]
    if failed:
        raise CheckpointError(failed[0])
    return result


# ----------------------------------------------------------------------------- sizes and free space

def _held_pieces(model: nn.Module, plan: ParallelPlan, with_moments: bool) -> dict[str, int]:
    """Key -> bytes of every piece this rank holds: model tensors and, `with_moments`, the AdamW
    moments of trainable parameters (pipeline copies homed elsewhere excluded: their home copy counts)."""
    held = {p.key: p.tensor.numel() * p.tensor.element_size() for p in model_pieces(model, plan)
            if not plan.is_mirror(p.tensor)}
    if with_moments:
        for name, param in adam.trainable(model):
            if not plan.is_mirror(param):
                held.update({moment_piece(m, name, param, plan, param).key: param.numel() * MOMENT_BYTES
                             for m in MOMENTS})
    return held


def _checkpoint_bytes(held_by_rank: list[dict[str, int]]) -> int:
    """Bytes of one checkpoint: each piece once (replicas share a key), plus 1% for the safetensors
    headers, trainer.pt and the index."""
    pieces: dict[str, int] = {}
    for held in held_by_rank:
        pieces.update(held)
    total = sum(pieces.values())
    return total + total // 100


def _free_bytes(path: str) -> int:
    """Free bytes of the filesystem that holds `path` (or would: its nearest existing parent)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def _shortfall(free: int, existing: list[int], one: int, keep_last: int) -> int:
    """Bytes missing for the next keep_last + 1 saves of `one` byte each, retention deleting the
    oldest checkpoints (`existing`, oldest first, then the new ones) beyond keep_last after each
    save; by then only new checkpoints remain and every save frees what the next one takes."""
    kept, short = list(existing), 0
    for _ in range(keep_last + 1):
        short = max(short, one - free)
        free -= one
        kept.append(one)
        while len(kept) > keep_last:
            free += kept.pop(0)
    return short


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _check_room(ckpt_dir: str, one: int, keep_last: int) -> None:
    free = _free_bytes(ckpt_dir)
    existing = [_dir_bytes(os.path.join(ckpt_dir, d)) for d in complete_checkpoints(ckpt_dir)]
    short = _shortfall(free, existing, one, keep_last)
    if short > 0:
        raise CheckpointError(f"checkpoint.dir {ckpt_dir} has {_size(free)} free, but checkpoint.keep_last={keep_last} "
                              f"checkpoints of {_size(one)} plus the one being written need {_size(short)} more (the "
                              f"{len(existing)} checkpoints there count as freed when retention deletes them); free "
                              f"{_size(short)} on that filesystem or lower checkpoint.keep_last")


def check_checkpoint_space(ckpt_dir: str, model: nn.Module, stepper, plan: ParallelPlan, keep_last: int) -> None:
    """Refuse to start a run whose checkpoints will not fit (collective; the same CheckpointError on
    every rank): the free space of `ckpt_dir`'s filesystem, with the checkpoints already there
    counted as freed when retention deletes them, must hold keep_last + 1 checkpoints of this
    run (model tensors and, when there is an optimizer, its AdamW moments, even before the first
    step), so that the run does not fail hours later at a save."""
    mesh = plan.mesh
    one = _checkpoint_bytes(_all_gather(_held_pieces(model, plan, with_moments=stepper is not None), mesh))
    _agree(mesh, lambda: _check_room(ckpt_dir, one, keep_last) if mesh.rank == 0 else None)


# ----------------------------------------------------------------------------- saving

def save_checkpoint(ckpt_dir: str, step: int, model: nn.Module, stepper, plan: ParallelPlan, trainer_state: dict,
                    keep_last: int, metadata: dict | None = None) -> str:
    """Write `ckpt_dir/step_XXXXXXXX` (collective); returns its path. When it does not fit, or a
    write fails on any rank, nothing is published: the `.tmp` is removed and every rank raises
    the same CheckpointError naming the directory, the free space and what to free."""
    mesh = plan.mesh
    with_moments = adam.adam_step(stepper) > 0
    held = _all_gather(_held_pieces(model, plan, with_moments), mesh)
    writer_of: dict[str, int] = {}
    for rank, keys in enumerate(held):
        for key in keys:
            writer_of.setdefault(key, rank)
    one = _checkpoint_bytes(held)
    final = os.path.join(ckpt_dir, f"step_{step:08d}")
    _agree(mesh, lambda: _prepare(ckpt_dir, final, one) if mesh.rank == 0 else None)
    files, tensors, failed = _write_pieces(final + ".tmp", model, stepper, plan, writer_of)
    parts = _all_gather((files, tensors, failed, trainer_state), mesh)
    message = None
    if mesh.rank == 0:
        info = {"step": step, "adam_step": adam.adam_step(stepper), "world_size": mesh.world_size,
                "layout": {"dp": mesh.dp, "pp": mesh.pp, "tp": mesh.tp, "ep": mesh.ep}, "trainer_state": True,
                **(metadata or {})}
        message = _finish(ckpt_dir, final, parts, info, keep_last, one)
    message = _all_gather(message, mesh)[0]
    if message is not None:
        raise CheckpointError(message)
    return final


def _prepare(ckpt_dir: str, final: str, one: int) -> None:
    """Rank 0: clear a `.tmp` left by an interrupted save, check that one more checkpoint fits and
    create the `.tmp`."""
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    free = _free_bytes(ckpt_dir)
    if free < one:
        raise CheckpointError(f"cannot save checkpoint {final}: it needs {_size(one)} and {ckpt_dir} has "
                              f"{_size(free)} free; free {_size(one - free)} on that filesystem "
                              f"({_what_to_free(ckpt_dir)}); {_unchanged(ckpt_dir)}")
    try:
        os.makedirs(tmp)
    except OSError as err:
        raise CheckpointError(_write_failure(ckpt_dir, final, err, one)) from err


def _write_pieces(tmp: str, model: nn.Module, stepper, plan: ParallelPlan,
                  writer_of: dict[str, int]) -> tuple[dict, dict, OSError | None]:
    """Write the pieces this rank owns into `tmp`: (files, tensors, the failed write or None).
    A failed write is returned, not raised: this rank still takes part in every moment's gather
    (a collective under ZeRO) and in the agreement that follows."""
    rank = plan.mesh.rank
    writer = PieceWriter(tmp, f"rank{rank:05d}")
    failed: OSError | None = None

    def add(piece) -> None:
        nonlocal failed
        if failed is None and writer_of[piece.key] == rank:
            try:
                writer.add(piece)
            except OSError as err:
                failed = err

    for piece in model_pieces(model, plan):
        if not plan.is_mirror(piece.tensor):
            add(piece)
    for name, values in adam.moments(stepper, model):          # one parameter at a time (collective under ZeRO)
        param = model.get_parameter(name)
        if not plan.is_mirror(param):
            for moment, tensor in values.items():
                add(moment_piece(moment, name, param, plan, tensor))
    if failed is None:
        try:
            writer.flush()
        except OSError as err:
            failed = err
    return writer.files, writer.tensors, failed


def _finish(ckpt_dir: str, final: str, parts: list, info: dict, keep_last: int, one: int) -> str | None:
    """Rank 0: publish the checkpoint and apply retention; on a failed write (here or on any rank)
    remove the `.tmp` instead and return the message every rank raises."""
    failed = next((err for _, _, err, _ in parts if err is not None), None)
    if failed is None:
        try:
            _publish(ckpt_dir, final, parts, info)
        except (OSError, CheckpointError) as err:
            failed = err
    if failed is not None:
        shutil.rmtree(final + ".tmp", ignore_errors=True)
        return _write_failure(ckpt_dir, final, failed, one)
    _retain(ckpt_dir, os.path.basename(final), keep_last)
    return None


def _publish(ckpt_dir: str, final: str, parts: list, info: dict) -> None:
    """Write trainer.pt (every rank's state) and the index into the `.tmp`, rename it and point `latest` at it."""
    tmp = final + ".tmp"
    files, tensors = merge_indexes([(part_files, part_tensors) for part_files, part_tensors, _, _ in parts])
    buffer = io.BytesIO()
    torch.save([state for _, _, _, state in parts], buffer)
    files[TRAINER_STATE] = write_bytes(os.path.join(tmp, TRAINER_STATE), buffer.getvalue())
    write_index(tmp, files, tensors, info)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_atomic(os.path.join(ckpt_dir, "latest"), os.path.basename(final) + "\n")


def _write_failure(ckpt_dir: str, final: str, err: Exception, one: int) -> str:
    """The one-line message for a save that failed with `err` (its `.tmp` already removed)."""
    if isinstance(err, CheckpointError):
        return f"{err}; {_unchanged(ckpt_dir)}"
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        free = _free_bytes(ckpt_dir)
        need = f"free {_size(one - free)}" if one > free else "free space"
        return (f"cannot save checkpoint {final}: no space left on the device ({err.filename or ckpt_dir}); "
                f"{ckpt_dir} has {_size(free)} free and a checkpoint needs {_size(one)}: {need} on that filesystem "
                f"({_what_to_free(ckpt_dir)}); {_unchanged(ckpt_dir)}")
    return f"cannot save checkpoint {final}: {one_line(err)}; check that {ckpt_dir} is writable; {_unchanged(ckpt_dir)}"


def _what_to_free(ckpt_dir: str) -> str:
    older = complete_checkpoints(ckpt_dir)[:-1]
    return f"e.g. the older checkpoints {first_names(older, 2)} of {ckpt_dir}" if older else "other files"


def _unchanged(ckpt_dir: str) -> str:
    previous = latest_checkpoint(ckpt_dir)
    return f"nothing was saved and {previous} is still the latest checkpoint" if previous else "nothing was saved"


def _retain(ckpt_dir: str, written: str, keep_last: int) -> None:
    """Keep the newest keep_last checkpoints, deleting only ones older (by step) than `written`:
    never `written` itself (what `latest` points to) nor a newer one, so that checkpoints of an
    earlier run with higher steps cannot push out the one just written."""
    found = complete_checkpoints(ckpt_dir)
    for old in found[:-keep_last]:
        if old < written:
            shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)


def latest_checkpoint(ckpt_dir: str) -> str | None:
    """The checkpoint `latest` points to (or the newest complete one if the pointer is missing)."""
    pointer = os.path.join(ckpt_dir, "latest")
    if os.path.exists(pointer):
        with open(pointer) as f:
            path = os.path.join(ckpt_dir, f.read().strip())
        if os.path.isdir(path):
            return path
    found = complete_checkpoints(ckpt_dir)
    return os.path.join(ckpt_dir, found[-1]) if found else None


def complete_checkpoints(ckpt_dir: str) -> list[str]:
    """Names of the complete checkpoints in `ckpt_dir`, oldest (lowest step) first."""
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(d for d in os.listdir(ckpt_dir) if _STEP_DIR.match(d))


# ----------------------------------------------------------------------------- loading

def resolve(path: str) -> str:
    """A checkpoint directory, or a checkpoint root holding `latest`."""
    if os.path.isfile(os.path.join(path, "latest")) or (os.path.isdir(path) and complete_checkpoints(path)):
        found = latest_checkpoint(path)
        if found is not None:
            return found
    return path


def check_model_tensors(reader: CheckpointReader, cfg: ModelConfig) -> None:
    """Raise unless the checkpoint holds exactly the model tensors of a model of `cfg`, with its
    global shapes: the whole model's, whatever part of it a pipeline stage holds."""
    expected = {MODEL + name: shape for name, shape in expected_tensors(cfg).items()}
    missing = [name for name in expected if name not in reader]
    if missing:
        raise CheckpointError(f"checkpoint {reader.path} has no tensor {first_names(missing, 1)}, which this model "
                              f"needs; {_config_difference(reader, cfg)}")
    extra = [name for name in reader.names(MODEL) if name not in expected]
    if extra:
        raise CheckpointError(f"checkpoint {reader.path} holds tensor {first_names(extra, 1)}, which this model "
                              f"lacks; {_config_difference(reader, cfg)}")
    for name, shape in expected.items():
        if reader.shape(name) != shape:
            raise CheckpointError(f"tensor {name} has shape {list(reader.shape(name))} in checkpoint {reader.path} "
                                  f"but {list(shape)} in this model; {_config_difference(reader, cfg)}")


def _config_difference(reader: CheckpointReader, cfg: ModelConfig) -> str:
    """How the model config recorded in the checkpoint differs from `cfg`, and what to do."""
    recorded = reader.metadata.get("model_config")
    if recorded is None:
        return "the checkpoint records no model config: load it into a model of the config that wrote it"
    ours = dataclasses.asdict(cfg)
    differences = [f"{key}={value} (this model: {ours[key]})" for key, value in recorded.items()
                   if key in ours and ours[key] != value]
    if not differences:
        return "its recorded model config is this one, so it is damaged or was written by another version of megads"
    return f"the checkpoint's model config differs: {', '.join(differences)}; load it with the config that wrote it"


def open_checkpoint(path: str, cfg: ModelConfig, mesh: Mesh, verify: bool = True,
                    trainer_state: bool = True) -> CheckpointReader:
    """The checkpoint at `path` (a checkpoint or a root with `latest`), checked before any tensor
    is copied (collective over `mesh`): its index and the tiling of its pieces, its model tensors
    against `cfg`, and, with `verify`, the sha256 of every file the load needs (the piece files,
    and trainer.pt when `trainer_state` and the checkpoint has one), rank r hashing files
    r, r + world_size, ... A problem found by any rank raises the same CheckpointError on every
    rank. `verify=False` (checkpoint.verify=false) skips only the hashing."""
    def check() -> CheckpointReader:
        reader = CheckpointReader(resolve(path))
        check_model_tensors(reader, cfg)
        if verify:
            needed = reader.data_files() + ([TRAINER_STATE] if trainer_state and reader.has_trainer_state else [])
            reader.verify(needed[mesh.rank::mesh.world_size])
        return reader

    reader = _agree(mesh, check)
    if verify and not reader.has_checksums and mesh.rank == 0:
        log.warning(f"checkpoint {reader.path} is of format version 1, which carries no checksums: its files are "
                    f"checked for size only (checkpoints saved from now on carry them)")
    return reader


def _read_trainer_state(reader: CheckpointReader) -> list[dict]:
    """Every rank's trainer state of a training checkpoint; refused when missing or unreadable."""
    path = os.path.join(reader.path, TRAINER_STATE)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {reader.path} was saved with trainer state but {TRAINER_STATE} is missing; "
                              f"{TRAINER_FIX}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CheckpointError(f"cannot read {path} (trainer state: step, data position, RNG): {one_line(err)}; "
                              f"{TRAINER_FIX}") from err


@torch.no_grad()
def _copy_weights(reader: CheckpointReader, model: DeepSeekV3, plan: ParallelPlan) -> None:
    """Copy every parameter and persistent buffer of `model` (any layout) from a checkpoint that
    `open_checkpoint` accepted."""
    for name, tensor in model_tensors(model).items():
        shape, offset = placement(tensor, plan)
        value = reader.read(MODEL + name, offset, tuple(tensor.shape), expect_global=shape)
        tensor.data.copy_(value)


def load_model_weights(path: str, model: DeepSeekV3, plan: ParallelPlan | None = None, verify: bool = True) -> dict:
    """Load the weights and router biases of a checkpoint written under any layout into `model`,
    parallelised as `plan` says (None: a single-process model). Optimizer and trainer state are
    ignored, and trainer.pt is not needed. `path` is a checkpoint directory or a checkpoint root
    with `latest`. Collective over the plan's mesh (see `open_checkpoint`). Returns the
    checkpoint's metadata (step, layout, ...)."""
    plan = plan or whole_model_plan(model)
    reader = open_checkpoint(path, model.cfg, plan.mesh, verify, trainer_state=False)
    _copy_weights(reader, model, plan)
    return reader.metadata


def load_checkpoint(path: str, model: DeepSeekV3, stepper, plan: ParallelPlan, verify: bool = True,
                    weights_only: bool = False) -> dict | None:
    """Load a checkpoint to continue training (collective; every check of `open_checkpoint` comes
    first). A training checkpoint restores the model, the AdamW state and returns this rank's
    trainer state; one without its trainer state is refused. Returns None when only the weights
    were loaded, either because `weights_only` asked for it (checkpoint.weights_only=true) or
    because the checkpoint holds weights only (converted from HuggingFace): the run then starts
    at step 0 with a new optimizer state."""
    mesh = plan.mesh
    reader = open_checkpoint(path, model.cfg, mesh, verify, trainer_state=not weights_only)
    training = reader.has_trainer_state and not weights_only
    states = _agree(mesh, lambda: _read_trainer_state(reader)) if training else None
    _copy_weights(reader, model, plan)
    adam.refresh_master_weights(stepper)
    if states is None:
        return None
    step = reader.metadata.get("adam_step", 0)
    if step > 0:
        def read(name: str, moment: str, param: torch.Tensor) -> torch.Tensor:
            shape, offset = placement(param, plan)
            return reader.read(moment_name(moment, name), offset, tuple(param.shape), expect_global=shape)
        adam.set_moments(stepper, model, step, read)
    # RNG streams belong to ranks: restored one to one when the world size is unchanged.
    return states[mesh.rank] if len(states) == mesh.world_size else states[0]
