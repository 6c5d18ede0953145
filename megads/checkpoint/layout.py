"""Where a rank's tensors sit in the global model: global names, global shapes, offsets.

A parallelised model keeps single-process names. The parallel plan (megads/parallel/plan.py)
gives each tensor's global shape and this rank's offset in it: a TP shard is chunk `tp_rank`
of `tp` equal chunks along its split dimension (the vocabulary-parallel embedding included), a
routed-expert shard starts at this EP rank's first expert along dimension 0 of [experts, out, in].
Everything else is whole on every rank that holds it. Pipeline stages hold `layers.{i}` under
the global index, so names need no stage offset. Copies of one tensor on several ranks (data
parallel replicas) have the same name and offset and are written once; pipeline copies whose
home is another rank (`plan.is_mirror`) are not written at all, their home copy is.
"""
from __future__ import annotations

import torch
from torch import nn

from megads.checkpoint.format import Piece
from megads.config import ModelConfig
from megads.model.deepseek_v3 import DeepSeekV3
from megads.parallel.plan import ParallelPlan

MODEL = "model."
OPTIMIZER = "optimizer."
MOMENTS = ("exp_avg", "exp_avg_sq")


def placement(tensor: torch.Tensor, plan: ParallelPlan) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(global shape, offset of this local tensor in it)."""
    p = plan.of(tensor)
    return p.shape, plan.offset(p)


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Global name -> shape of every parameter and persistent buffer of a single-process model
    of `cfg` (what a checkpoint of that config holds, whatever part of it a rank has)."""
    with torch.device("meta"):
        model = DeepSeekV3(cfg)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Name -> parameter or persistent buffer (the tensors themselves, which the plan knows)."""
    return dict(model.state_dict(keep_vars=True))


def model_pieces(model: nn.Module, plan: ParallelPlan) -> list[Piece]:
    return [Piece(MODEL + name, *placement(tensor, plan), tensor) for name, tensor in model_tensors(model).items()]


def moment_name(moment: str, name: str) -> str:
    return f"{OPTIMIZER}{moment}.{name}"


def moment_piece(moment: str, name: str, param: torch.Tensor, plan: ParallelPlan, value: torch.Tensor) -> Piece:
    """The piece of optimizer state `moment` (value shaped like the local `param`)."""
    return Piece(moment_name(moment, name), *placement(param, plan), value)
