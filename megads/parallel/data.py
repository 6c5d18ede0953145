"""Data parallelism and the optimizer step.

Two implementations of one small interface (backward / step / zero_grad / state):

- `LocalOptimizer`: megads' AdamW on the full local parameters; gradients averaged over DP
  with all-reduce when dp > 1 (parallel.zero_stage=0). Used on one process.
- `DeepSpeedOptimizer`: the same AdamW wrapped by DeepSpeed's ZeRO stage 1 or 2 (optimizer
  state, and with stage 2 gradients, partitioned over DP), with a Megatron-style mpu built from
  the mesh so that clipping uses one global norm over all TP and PP ranks.

Both clip to `train.grad_clip` with the global norm and skip the update when it is not finite.
Parameters live in fp32 (master weights); on GPU the forward runs under bf16 autocast.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from megads.config import Config, ConfigError
from megads.model.moe import MoE
from megads.parallel.deepspeed_adapter import describe_placement, megads_moe_recognised, quiet_deepspeed, \
    register_expert_groups
from megads.parallel.builder import uses_deepspeed
from megads.parallel.mesh import Mesh
from megads.parallel.plan import ParallelPlan


@dataclass
class StepOutcome:
    grad_norm: float
    applied: bool
    bad_tensor: str | None = None     # the first non-finite gradient, when known


def global_grad_norm(named_params: list[tuple[str, nn.Parameter]], plan: ParallelPlan) -> torch.Tensor:
    """2-norm over the whole model, every element counted once (`plan.counts_in_norm`): TP shards
    on all TP ranks, replicated dense parameters on TP rank 0 (summed over TP x PP), expert shards
    on the first rank of their expert-data-parallel group (summed over all ranks), pipeline copies
    on their home rank only."""
    mesh = plan.mesh
    device = named_params[0][1].device if named_params else torch.device("cpu")
    dense = torch.zeros((), dtype=torch.float64, device=device)
    experts = torch.zeros((), dtype=torch.float64, device=device)
    for _, p in named_params:
        placement = plan.of(p)
        if plan.counts_in_norm(placement):
            total = experts if placement.expert else dense
            total += p.grad.double().pow(2).sum()
    if mesh.group("mp") is not None:
        dist.all_reduce(dense, group=mesh.group("mp"))
    if mesh.ep > 1:
        dist.all_reduce(experts)
    return (dense + experts).sqrt()


def average_gradients(named_params: list[tuple[str, nn.Parameter]], plan: ParallelPlan) -> None:
    """Each gradient summed over the group the plan gives it, divided by dp: dense gradients are
    the mean over DP; expert gradients the sum over the expert-data-parallel group / dp, since
    each expert already received the tokens of its whole EP group."""
    mesh = plan.mesh
    for _, p in named_params:
        group = mesh.group(plan.of(p).grad_group)
        if group is not None:
            dist.all_reduce(p.grad, group=group)
        if mesh.dp > 1:
            p.grad.div_(mesh.dp)


class LocalOptimizer:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, plan: ParallelPlan, grad_clip: float):
        self.model, self.optimizer, self.plan, self.grad_clip = model, optimizer, plan, grad_clip

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> StepOutcome:
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        missing = [n for n, p in named if p.grad is None]
        if missing:      # a lost gradient would leave the tensor untrained, and the step look faster
            raise RuntimeError(f"no gradient reached {len(missing)} parameters this step ({', '.join(missing[:3])}"
                               f"{', ...' if len(missing) > 3 else ''}): the backward lost them")
        average_gradients(named, self.plan)
        norm = global_grad_norm(named, self.plan)
        grad_norm = float(norm)
        if not math.isfinite(grad_norm):
            bad = next((n for n, p in named if not torch.isfinite(p.grad).all()), "grad_norm")
            self.zero_grad()
            return StepOutcome(grad_norm, False, f"{bad}.grad")
        if self.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_([p for _, p in named], self.grad_clip, norm.float())
        self.optimizer.step()
        self.zero_grad()
        return StepOutcome(grad_norm, True)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- DeepSpeed

class MeshMPU:
    """The Megatron-style `mpu` DeepSpeed asks for. "Model parallel" rank/group follow
    DeepSpeed's use of them: the rank decides which replicated parameters count towards the
    norm (TP rank 0), the group sums norms over every rank of one replica (TP x PP)."""

    def __init__(self, mesh: Mesh):
        self.mesh = mesh

    def get_model_parallel_rank(self) -> int:
        return self.mesh.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.mesh.tp

    def get_model_parallel_group(self):
        return self.mesh.process_group("mp")

    def get_tensor_model_parallel_rank(self) -> int:
        return self.mesh.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.mesh.tp

    def get_tensor_model_parallel_group(self):
        return self.mesh.process_group("tp")

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.mesh.rank - self.mesh.tp_rank

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.mesh.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.mesh.pp

    def get_pipeline_model_parallel_group(self):
        return self.mesh.process_group("pp")

    def get_data_parallel_rank(self) -> int:
        return self.mesh.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.mesh.dp

    def get_data_parallel_group(self):
        return self.mesh.process_group("dp")

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self.mesh.ranks["dp"]


# Settings megads derives itself; a user's extra DeepSpeed JSON may not change them.
_CONTROLLED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
               "gradient_clipping", "optimizer", "scheduler", "fp16", "bf16", "managed_gradient_accumulation",
               "zero_optimization.stage")


def deepspeed_config(cfg: Config, mesh: Mesh) -> dict:
    """The DeepSpeed config megads generates, merged with `parallel.deepspeed_config` (extra keys only)."""
    t = cfg.train
    micro_batches = t.global_batch // (mesh.dp * t.micro_batch)
    generated = {
        "train_batch_size": t.global_batch,
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": micro_batches,
        "managed_gradient_accumulation": False,      # megads' loop (or pipeline schedule) owns the boundary
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage, "overlap_comm": False,
                              "contiguous_gradients": True},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2 ** 62,
        "wall_clock_breakdown": False,
    }
    if cfg.parallel.deepspeed_config:
        with open(cfg.parallel.deepspeed_config) as f:
            extra = json.load(f)
        _merge(generated, extra, "")
    return generated


def _merge(base: dict, extra: dict, prefix: str) -> None:
    for key, value in extra.items():
        path = prefix + key
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value, path + ".")
            continue
        if path in _CONTROLLED and base.get(key) != value:
            raise ConfigError(f"parallel.deepspeed_config sets {path}={value!r}, which megads controls "
                              f"(it is {base.get(key)!r} here); set it through megads' own config instead")
        base[key] = value


class DeepSpeedOptimizer:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, plan: ParallelPlan, cfg: Config):
        quiet_deepspeed(next(model.parameters()).device)
        import deepspeed
        mesh = self.mesh = plan.mesh
        describe_placement(model, plan)
        experts = [p for p in model.parameters() if plan.of(p).expert]
        if experts:
            register_expert_groups(experts, optimizer, mesh)
        with megads_moe_recognised(MoE if experts else None):
            self.engine, self.optimizer, _, _ = deepspeed.initialize(
                model=model, optimizer=optimizer, config=deepspeed_config(cfg, mesh), mpu=MeshMPU(mesh),
                dist_init_required=False)
        self.base_optimizer = optimizer

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> StepOutcome:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else float("nan")
        applied = self.engine.was_step_applied()
        return StepOutcome(grad_norm, applied, None if applied else "gradients (global norm not finite)")

    def zero_grad(self) -> None:
        self.engine.zero_grad()


def build_step_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, plan: ParallelPlan, cfg: Config):
    """DeepSpeed ZeRO when data parallel with zero_stage >= 1, else the local optimizer."""
    if uses_deepspeed(cfg, plan.mesh):
        return DeepSpeedOptimizer(model, optimizer, plan, cfg)
    return LocalOptimizer(model, optimizer, plan, cfg.train.grad_clip)
