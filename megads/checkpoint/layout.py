"""Where a rank's tensors sit in the global model: global names, global shapes, offsets.

A parallelised model keeps single-process names except for the expert-parallel wrapper
(`experts.local.`), and marks its shards with attributes:

- tensor parallelism (parallel/tensor.py): `tensor_model_parallel` and `partition_dim`; the
  shard is chunk `tp_rank` of `tp` equal chunks along that dimension (the vocabulary-parallel
  embedding included);
- expert parallelism (parallel/expert.py): `expert_parallel` and `expert_offset`, the global
  index of the first local expert along dimension 0 of [experts, out, in].

Everything else is whole on every rank that holds it. Pipeline stages hold `layers.{i}` under
the global index, so names need no stage offset. Copies of one tensor on several ranks (data
parallel replicas) have the same name and offset and are written once; DualPipe's mirrored
copies (`pipeline_mirror`, parallel/pipeline/placement.py) are not written at all, their home
copy is.
"""
from __future__ import annotations

import torch
from torch import nn

from megads.checkpoint.format import Piece
from megads.config import ModelConfig
from megads.model.deepseek_v3 import DeepSeekV3
from megads.parallel.mesh import Mesh

MODEL = "model."
OPTIMIZER = "optimizer."
MOMENTS = ("exp_avg", "exp_avg_sq")


def global_name(local_name: str) -> str:
    """The single-process name of a parameter or buffer of a parallelised model."""
    return local_name.replace("experts.local.", "experts.")


def placement(tensor: torch.Tensor, mesh: Mesh) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(global shape, offset of this local tensor in it)."""
    shape, offset = list(tensor.shape), [0] * tensor.dim()
    if getattr(tensor, "tensor_model_parallel", False) and mesh.tp > 1:
        dim = tensor.partition_dim
        offset[dim] = mesh.tp_rank * shape[dim]
        shape[dim] *= mesh.tp
    if getattr(tensor, "expert_parallel", False) and mesh.ep > 1:
        offset[0] = tensor.expert_offset
        shape[0] *= mesh.ep
    return tuple(shape), tuple(offset)


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Global name -> shape of every parameter and persistent buffer of a single-process model
    of `cfg` (what a checkpoint of that config holds, whatever part of it a rank has)."""
    with torch.device("meta"):
        model = DeepSeekV3(cfg)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Local name -> parameter or persistent buffer (parameters keep their sharding attributes)."""
    return dict(model.state_dict(keep_vars=True))


def model_pieces(model: nn.Module, mesh: Mesh) -> list[Piece]:
    pieces = []
    for name, tensor in model_tensors(model).items():
        shape, offset = placement(tensor, mesh)
        pieces.append(Piece(MODEL + global_name(name), shape, offset, tensor))
    return pieces


def moment_name(moment: str, local_name: str) -> str:
    return f"{OPTIMIZER}{moment}.{global_name(local_name)}"


def moment_piece(moment: str, local_name: str, param: torch.Tensor, mesh: Mesh, value: torch.Tensor) -> Piece:
    """The piece of optimizer state `moment` (value shaped like the local `param`)."""
    return Piece(moment_name(moment, local_name), *placement(param, mesh), value)
