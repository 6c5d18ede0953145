"""The one place a model is built for a config and a mesh.

Every rank builds and initialises the whole single-process model from the same seed, then the
parallelisms are applied from outside, always in this order:

    tensor   parallel/tensor.py    shard heads, MLP widths and the vocabulary over TP
    expert   parallel/expert.py    keep this EP rank's routed experts, route through all-to-all
    fp8      fp8/apply.py          FP8 GEMMs on the local shards (they see TP / EP slices)
    pipeline parallel/pipeline/    keep this rank's stages, defer weight gradients, the executor

so the sharded model is exactly the single-process one. Pretraining, SFT / GRPO, checkpoint
conversion, tests and benchmarks all build through `build_model`.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from megads.config import Config
from megads.fp8 import apply_fp8
from megads.fp8.linear import FP8Recipe
from megads.model.deepseek_v3 import DeepSeekV3
from megads.parallel.expert import parallelize_experts
from megads.parallel.mesh import Mesh
from megads.parallel.pipeline.build import build_pipeline
from megads.parallel.pipeline.executor import PipelineExecutor
from megads.parallel.tensor import parallelize_tensor

ORDER = ("tensor", "expert", "fp8", "pipeline")


@dataclass
class BuiltModel:
    model: DeepSeekV3                      # this rank's part, single-process names
    fp8_recipe: FP8Recipe | None           # None unless fp8.enabled
    pipeline: PipelineExecutor | None      # None unless parallel.pp > 1
    applied: tuple[str, ...]               # the steps of ORDER this layout needed, in that order


def build_model(cfg: Config, mesh: Mesh, device: torch.device,
                autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                initialise: bool = True) -> BuiltModel:
    """The model of `cfg` on this rank of `mesh`. `initialise=False` skips the seeded weights (a
    checkpoint fills them, or the model lives on the meta device to read shapes); `autocast` is
    the context the pipeline runs its pieces in."""
    torch.manual_seed(cfg.train.seed)
    if device.type == "meta":
        with torch.device("meta"):
            model = DeepSeekV3(cfg.model)
    else:
        model = DeepSeekV3(cfg.model).to(device)
    if initialise:
        model.init_weights()
    applied = []
    if mesh.tp > 1:
        parallelize_tensor(model, mesh, cfg.parallel.sequence_parallel)
        applied.append("tensor")
    if mesh.ep > 1:
        parallelize_experts(model, mesh, cfg.parallel.sequence_parallel)
        applied.append("expert")
    recipe = apply_fp8(model, cfg.fp8)
    if recipe is not None:
        applied.append("fp8")
    pipeline = build_pipeline(model, cfg, mesh, autocast) if mesh.pp > 1 else None
    if pipeline is not None:
        applied.append("pipeline")
    return BuiltModel(model, recipe, pipeline, tuple(applied))
