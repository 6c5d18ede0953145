"""Saving and loading training checkpoints under any parallel layout (the one save path).

A checkpoint is `step_XXXXXXXX/` in the checkpoint directory, in the format of
`checkpoint/format.py`: the model's tensors (`model.<single-process name>`, router biases
included) and the AdamW moments (`optimizer.exp_avg.<name>`, `optimizer.exp_avg_sq.<name>`),
each with its global shape, plus `trainer.pt` (step, data position, RNG states, config).

Saving (collective over all ranks): every rank lists the pieces it holds; a piece held by
several ranks (replicas) is written by the lowest of them. Ranks write their files into
`step_XXXXXXXX.tmp/`; rank 0 then writes the index, renames the directory, points `latest`
at it and deletes all but the newest `keep_last` checkpoints. A directory named `step_*`
is therefore always complete.

Loading (each rank independently, no collectives except ZeRO's state fan-out): the
checkpoint's model tensors must be exactly those of the model's config, global shapes
included (checked against the whole model, not only the stages this rank holds); then every
local tensor reads exactly its region of the global tensor, so a checkpoint written under any
(DP, PP, TP, EP, schedule) loads under any other.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil

import torch
import torch.distributed as dist
from torch import nn

from megads.checkpoint import optimizer as adam
from megads.checkpoint.format import CheckpointError, CheckpointReader, PieceWriter, first_names, merge_indexes, \
    write_atomic, write_index
from megads.checkpoint.layout import MODEL, MOMENTS, expected_tensors, global_name, model_pieces, model_tensors, \
    moment_name, moment_piece, placement
from megads.config import ModelConfig
from megads.model.deepseek_v3 import DeepSeekV3
from megads.parallel.mesh import Mesh
from megads.parallel.pipeline.placement import is_mirror

TRAINER_STATE = "trainer.pt"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def _all_gather(obj, mesh: Mesh) -> list:
    if mesh.world_size == 1:
        return [obj]
    out = [None] * mesh.world_size
    dist.all_gather_object(out, obj)
    return out


def _barrier(mesh: Mesh) -> None:
    if mesh.world_size > 1:
        dist.barrier()


def save_checkpoint(ckpt_dir: str, step: int, model: nn.Module, stepper, mesh: Mesh, trainer_state: dict,
                    keep_last: int, metadata: dict | None = None) -> str:
    """Write `ckpt_dir/step_XXXXXXXX` (collective); returns its path."""
    pieces = [p for p in model_pieces(model, mesh) if not is_mirror(p.tensor)]
    params = [(n, p) for n, p in adam.trainable(model) if not is_mirror(p)] if adam.adam_step(stepper) > 0 else []
    keys = [p.key for p in pieces] + [moment_piece(m, n, p, mesh, p).key for n, p in params for m in MOMENTS]
    writer_of: dict[str, int] = {}
    for rank, held in enumerate(_all_gather(keys, mesh)):
        for key in held:
            writer_of.setdefault(key, rank)

    final = os.path.join(ckpt_dir, f"step_{step:08d}")
    tmp = final + ".tmp"
    if mesh.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier(mesh)
    writer = PieceWriter(tmp, f"rank{mesh.rank:05d}")
    for piece in pieces:
        if writer_of[piece.key] == mesh.rank:
            writer.add(piece)
    for name, values in adam.moments(stepper, model):          # one parameter at a time (collective under ZeRO)
        param = model.get_parameter(name)
        for moment, tensor in values.items():
            piece = moment_piece(moment, name, param, mesh, tensor)
            if not is_mirror(param) and writer_of[piece.key] == mesh.rank:
                writer.add(piece)
    writer.flush()
    indexes = _all_gather((writer.files, writer.tensors), mesh)
    states = _all_gather(trainer_state, mesh)
    if mesh.rank == 0:
        files, tensors = merge_indexes(indexes)
        info = {"step": step, "adam_step": adam.adam_step(stepper), "world_size": mesh.world_size,
                "layout": {"dp": mesh.dp, "pp": mesh.pp, "tp": mesh.tp, "ep": mesh.ep}, **(metadata or {})}
        torch.save(states, os.path.join(tmp, TRAINER_STATE))
        write_index(tmp, files, tensors, info)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        write_atomic(os.path.join(ckpt_dir, "latest"), os.path.basename(final) + "\n")
        for old in complete_checkpoints(ckpt_dir)[:-keep_last]:
            shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
    _barrier(mesh)
    return final


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
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(d for d in os.listdir(ckpt_dir) if _STEP_DIR.match(d))


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


@torch.no_grad()
def load_model(reader: CheckpointReader, model: DeepSeekV3, mesh: Mesh) -> None:
    """Copy every parameter and persistent buffer of `model` (any layout) from the checkpoint."""
    check_model_tensors(reader, model.cfg)
    for name, tensor in model_tensors(model).items():
        shape, offset = placement(tensor, mesh)
        value = reader.read(MODEL + global_name(name), offset, tuple(tensor.shape), expect_global=shape)
        tensor.data.copy_(value)


def load_model_weights(path: str, model: DeepSeekV3, mesh: Mesh | None = None) -> dict:
    """Load the weights and router biases of a checkpoint written under any layout into an
    already-parallelised `model` (optimizer state is ignored). `path` is a checkpoint directory
    or a checkpoint root with `latest`. Returns the checkpoint's metadata (step, layout, ...)."""
    reader = CheckpointReader(resolve(path))
    load_model(reader, model, mesh or Mesh())
    return reader.metadata


def load_checkpoint(path: str, model: DeepSeekV3, stepper, mesh: Mesh) -> dict | None:
    """Load model, optimizer state (when the checkpoint has it) and return this rank's trainer
    state (None for a weights-only checkpoint, e.g. one converted from HuggingFace)."""
    reader = CheckpointReader(resolve(path))
    load_model(reader, model, mesh)
    adam.refresh_master_weights(stepper)
    step = reader.metadata.get("adam_step", 0)
    if step > 0:
        def read(name: str, moment: str, param: torch.Tensor) -> torch.Tensor:
            shape, offset = placement(param, mesh)
            return reader.read(moment_name(moment, name), offset, tuple(param.shape), expect_global=shape)
        adam.set_moments(stepper, model, step, read)
    state_path = os.path.join(reader.path, TRAINER_STATE)
    if not os.path.exists(state_path):
        return None
    try:
        states = torch.load(state_path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CheckpointError(f"cannot read {state_path} (trainer state: step, data position, RNG): {err}") from err
    # RNG streams belong to ranks: restored one to one when the world size is unchanged.
    return states[mesh.rank] if len(states) == mesh.world_size else states[0]
