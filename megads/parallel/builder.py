"""The one place a model is built for a config and a mesh.

The parallel plan (parallel/plan.py) is computed first, from the config and the mesh alone. Every
rank then builds and initialises the whole single-process model from the same seed, and the
parallelisms are applied from outside, always in this order:

    tensor   parallel/tensor.py    split heads, MLP widths and the vocabulary; TP-region boundaries
    expert   parallel/expert.py    keep this EP rank's routed experts; exchange rows all-to-all
    fp8      fp8/apply.py          FP8 GEMMs on the local shards (they see TP / EP slices)
    pipeline parallel/pipeline/    keep this rank's stages, defer weight gradients, the executor
    precision model/precision.py   bf16 weight copies made once a step and fp32 weight gradients
                                   written by the GEMMs (`train.precision=main_grads`), for the
                                   GEMMs FP8 left, on the weights this rank kept
    recompute model/recompute.py   each decoder layer's activations recomputed in backward
                                   (`train.recompute`)
    compile  (here)                torch.compile each decoder layer (`train.compile`), last: it
                                   traces the layers as the steps before left them

Weights are split as the plan says (`shard`); each step says how layers run by giving strategies
(module name -> a layer's strategy dataclass), a later step refining an earlier one's; the
builder hands every layer its final strategy, registers the gradient sums over TP the plan
declares, and binds the plan to the result. So the sharded model is exactly the single-process
one, and the plan says where each of its tensors lives. Pretraining, SFT / GRPO, tests and
benchmarks all build through `build_model`; checkpoint resharding needs the plan alone.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from megads.config import Config
from megads.fp8 import build_recipe, fp8_send_rows, fp8_strategies
from megads.fp8.linear import FP8Recipe
from megads.model.block import DecoderLayer, DecoderLayerStrategy
from megads.model.deepseek_v3 import DeepSeekV3
from megads.model.moe import ExpertsStrategy
from megads.model.precision import WeightCopies, main_grad_strategies
from megads.model.recompute import recompute_run
from megads.parallel.expert import AllToAllExchange, expert_strategies
from megads.parallel.mesh import Mesh
from megads.parallel.pipeline.build import build_pipeline
from megads.parallel.pipeline.executor import PipelineExecutor
from megads.parallel.pipeline.zero_bubble import deferred_strategies
from megads.parallel.plan import ParallelPlan, plan_layout, shard
from megads.parallel.tensor import reduce_grad_over_tp, tensor_strategies

ORDER = ("tensor", "expert", "fp8", "pipeline", "precision", "recompute", "compile")


@dataclass
class BuiltModel:
    model: DeepSeekV3                      # this rank's part, single-process names
    plan: ParallelPlan                     # where each of its tensors lives, what each layer was handed
    fp8_recipe: FP8Recipe | None           # None unless fp8.enabled
    pipeline: PipelineExecutor | None      # None unless parallel.pp > 1
    applied: tuple[str, ...]               # the steps of ORDER this layout needed, in that order
    weight_copies: WeightCopies | None = None   # the GEMM weights' bf16 copies (train.precision=main_grads)

    def weights_changed(self) -> None:
        """Call after the weights change (an optimizer step, a checkpoint load): their FP8 blocks are
        forgotten and their bf16 copies made anew (the copies are refreshed in place: compiled
        layers keep reading the same tensors)."""
        if self.fp8_recipe is not None:
            self.fp8_recipe.clear()
        if self.weight_copies is not None:
            self.weight_copies.refresh()


def build_model(cfg: Config, mesh: Mesh, device: torch.device,
                autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                initialise: bool = True, compile_backend: str = "inductor",
                dtype: torch.dtype = torch.float32) -> BuiltModel:
    """The model of `cfg` on this rank of `mesh`. `initialise=False` skips the seeded weights (a
    checkpoint fills them, or the model lives on the meta device to read shapes); `autocast` is
    the context the pipeline runs its pieces in; `compile_backend` is torch.compile's when
    `train.compile` compiles the layers; `dtype` is the compute dtype (the autocast one): with
    bf16 and `train.precision=main_grads` the GEMMs get the precision layout of model/precision.py."""
    plan = plan_layout(cfg, mesh)
    torch.manual_seed(cfg.train.seed)
    if device.type == "meta":
        with torch.device("meta"):
            model = DeepSeekV3(cfg.model)
    else:
        model = DeepSeekV3(cfg.model).to(device)
    if initialise:
        model.init_weights()
    sp = cfg.parallel.sequence_parallel
    strategies: dict[str, object] = {}
    applied = []
    if mesh.tp > 1:
        shard(model, plan, tensor_parallel=True, expert_parallel=False)
        strategies.update(tensor_strategies(model, mesh, sp))
        applied.append("tensor")
    if mesh.ep > 1:
        shard(model, plan, tensor_parallel=False, expert_parallel=True)
        strategies.update(expert_strategies(model, mesh, sp, strategies))
        applied.append("expert")
    recipe = build_recipe(cfg.fp8) if cfg.fp8.enabled else None
    fp8_layers: dict[str, object] = {}
    if recipe is not None:
        fp8_layers = fp8_strategies(model, recipe, tuple(cfg.fp8.exclude), strategies)
        strategies.update(fp8_layers)
        if cfg.fp8.dispatch:
            strategies.update(_fp8_dispatch(strategies, recipe))
        applied.append("fp8")
    pipeline = build_pipeline(model, cfg, mesh, autocast) if mesh.pp > 1 else None
    if pipeline is not None:
        if pipeline.schedule.splits_backward:
            strategies.update(deferred_strategies(model, strategies))
        applied.append("pipeline")
    copies = None
    if dtype != torch.float32 and uses_main_grads(cfg, mesh, device):
        copies = WeightCopies(dtype)
        strategies.update(main_grad_strategies(model, copies, strategies, keep=set(fp8_layers),
                                               accumulates=not uses_deepspeed(cfg, mesh),
                                               returns=_hook_reduced(model, plan)))
        applied.append("precision")
    if cfg.train.recompute != "none":
        run = recompute_run(cfg.train.recompute)
        strategies.update({name: DecoderLayerStrategy(run) for name, m in model.named_modules() if isinstance(m, DecoderLayer)})
        applied.append("recompute")
    if cfg.train.head_loss == "fused":
        strategies[""] = replace(strategies.get("", model.strategy), fused_head=True)
    plan.strategies = _hand_over(model, strategies)
    for name, param in model.named_parameters():
        if plan.placements[name].tp_grad_sum:
            reduce_grad_over_tp(param, mesh.group("tp"))
    plan.bind(model)
    if compiles_layers(cfg, mesh, device):
        for layer in model.modules():
            if isinstance(layer, DecoderLayer):
                layer.compile(backend=compile_backend)
        applied.append("compile")
    assert tuple(applied) == tuple(s for s in ORDER if s in applied)
    return BuiltModel(model, plan, recipe, pipeline, tuple(applied), copies)


def uses_main_grads(cfg: Config, mesh: Mesh, device: torch.device) -> bool:
    """`train.precision`: main_grads, or auto where the layers are not compiled (compiled layers
    under autocast are the fastest step measured so far; the compiled main-grad GEMMs are checked
    on CPU, not yet timed on GPU)."""
    if cfg.train.precision == "auto":
        return not compiles_layers(cfg, mesh, device)
    return cfg.train.precision == "main_grads"


def uses_deepspeed(cfg: Config, mesh: Mesh) -> bool:
    """Data parallelism through DeepSpeed ZeRO (it reduces gradients from autograd hooks)."""
    return mesh.dp > 1 and cfg.parallel.zero_stage >= 1


def _hook_reduced(model: nn.Module, plan: ParallelPlan) -> set[str]:
    """Modules owning a weight whose gradient a hook sums over TP (plan: `tp_grad_sum`)."""
    return {name.rpartition(".")[0] for name, _ in model.named_parameters() if plan.placements[name].tp_grad_sum}


def compiles_layers(cfg: Config, mesh: Mesh, device: torch.device) -> bool:
    """`train.compile`: layers, or auto on a single GPU process without FP8, the setting measured in
    benchmarks/RESULTS.md (data parallelism over ZeRO asks for `layers` until it is measured too)."""
    if cfg.train.compile == "auto":
        return device.type == "cuda" and mesh.world_size == 1 and not cfg.fp8.enabled
    return cfg.train.compile == "layers"


def _fp8_dispatch(strategies: dict[str, object], recipe: FP8Recipe) -> dict[str, object]:
    """The routed experts' all-to-all dispatch sending E4M3 rows (`fp8.dispatch`)."""
    return {name: replace(s, exchange=replace(s.exchange, send_rows=fp8_send_rows(recipe)))
            for name, s in strategies.items()
            if isinstance(s, ExpertsStrategy) and isinstance(s.exchange, AllToAllExchange)}


def _hand_over(model: nn.Module, strategies: dict[str, object]) -> dict[str, object]:
    """Give every layer of this rank its strategy (layers the pipeline pruned are gone); returns
    those handed over."""
    handed = {}
    for name, module in model.named_modules():
        if name in strategies:
            if type(strategies[name]) is not type(module.strategy):
                raise TypeError(f"{name} runs a {type(module.strategy).__name__}, not a {type(strategies[name]).__name__}")
            module.strategy = handed[name] = strategies[name]
    return handed
