"""The parallel plan: where every tensor of the model lives under a layout, as data.

`plan_layout(cfg, mesh)` computes it from the config and the mesh's sizes and rank alone (no
process group, no weights), so that `python -m megads.pretrain CONFIG --print-plan` can show it
before anything starts. For every parameter and persistent buffer of the single-process model
it declares a `Placement`: its global shape, the dimension tensor parallelism splits, whether
it is a routed-expert tensor split over expert parallelism, the group that reduces its gradient,
the pipeline stages that use it and the pipeline ranks holding a copy, whether it decays.

The model builder shards the model by the plan and binds the plan to the result; from then on
the optimizer groups, gradient reduction, the global norm, DeepSpeed's groups and the checkpoint
layout ask the plan about a tensor (`plan.of(tensor)`). Nothing reads placement off a tensor.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields

import torch
from torch import nn

from megads.config import Config
from megads.model.deepseek_v3 import DeepSeekV3
from megads.model.moe import GroupedExperts, Router
from megads.parallel.mesh import Mesh
from megads.parallel.pipeline.build import micro_batches_per_step
from megads.parallel.pipeline.placement import holders, parameter_stages, stage_specs
from megads.parallel.pipeline.schedules import build_schedule
from megads.parallel.tensor import tensor_split_dims


@dataclass(frozen=True)
class Placement:
    """One tensor of the single-process model under a layout."""
    name: str                      # the single-process name (checkpoints and conversion use it)
    shape: tuple[int, ...]         # global shape
    tp_dim: int | None             # split in tp equal chunks along this dimension; None: whole on every TP rank
    expert: bool                   # a routed-expert tensor [experts, out, in]: dimension 0 split over EP
    tp_grad_sum: bool              # whole on every TP rank but fed this rank's tokens only: gradient summed over TP
    stages: tuple[int, ...]        # pipeline stages that use it
    holders: tuple[int, ...]       # pipeline ranks holding a copy, its home (the one that counts) first
    decays: bool                   # AdamW weight decay applies (matrices; not norms, not the router bias)
    parameter: bool                # False: a persistent buffer (the router bias)

    @property
    def grad_group(self) -> str:
        """The mesh group averaging its gradient: DP, or EDP for routed experts (their EP group
        already brought them the tokens of all its ranks)."""
        return "edp" if self.expert else "dp"


@dataclass
class ParallelPlan:
    mesh: Mesh
    placements: dict[str, Placement]                 # global name -> placement, the whole model's tensors
    sequence_parallel: bool = False
    schedule: str | None = None                      # the pipeline schedule, None without PP
    strategies: dict[str, object] = field(default_factory=dict)   # module name -> what the builder handed it
    _bound: dict[int, Placement] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ this rank's tensors

    def local_shape(self, placement: Placement) -> tuple[int, ...]:
        shape = list(placement.shape)
        if placement.tp_dim is not None:
            shape[placement.tp_dim] //= self.mesh.tp
        if placement.expert:
            shape[0] //= self.mesh.ep
        return tuple(shape)

    def offset(self, placement: Placement) -> tuple[int, ...]:
        """Where this rank's part of the tensor starts in the global one."""
        offset = [0] * len(placement.shape)
        local = self.local_shape(placement)
        if placement.tp_dim is not None:
            offset[placement.tp_dim] = self.mesh.tp_rank * local[placement.tp_dim]
        if placement.expert:
            offset[0] = self.mesh.ep_rank * local[0]
        return tuple(offset)

    def local_part(self, placement: Placement, whole: torch.Tensor) -> torch.Tensor:
        """This rank's part of the global tensor `whole`."""
        for dim, (start, size) in enumerate(zip(self.offset(placement), self.local_shape(placement))):
            whole = whole.narrow(dim, start, size)
        return whole

    def bind(self, model: nn.Module) -> None:
        """Index this rank's tensors of `model` (parameters and persistent buffers, by their global
        names) and check that each has the shape the plan gives it here."""
        self._bound = {}
        for name, tensor in model.state_dict(keep_vars=True).items():
            placement = self.placements.get(name)
            if placement is None:
                raise ValueError(f"the model holds {name}, which the parallel plan does not know")
            if tuple(tensor.shape) != self.local_shape(placement):
                raise ValueError(f"{name} is {list(tensor.shape)} on this rank, but the parallel plan puts "
                                 f"{list(self.local_shape(placement))} of its {list(placement.shape)} here")
            self._bound[id(tensor)] = placement

    def of(self, tensor: torch.Tensor) -> Placement:
        """The placement of one of the bound model's tensors."""
        placement = self._bound.get(id(tensor))
        if placement is None:
            raise KeyError(f"a tensor {list(tensor.shape)} that is not part of the model this plan was bound to")
        return placement

    def is_mirror(self, tensor: torch.Tensor) -> bool:
        """A pipeline copy whose home is another pipeline rank (its gradient is summed into the
        home copy's; norms and checkpoints count the home copy only)."""
        return self.of(tensor).holders[0] != self.mesh.pp_rank

    def counts_in_norm(self, p: Placement) -> bool:
        """Whether this rank adds its part of the tensor's gradient to the global norm: each
        element once, over TP shards, expert shards, replicas and pipeline copies."""
        if p.holders[0] != self.mesh.pp_rank:
            return False
        if p.expert:
            return self.mesh.edp_rank == 0
        return p.tp_dim is not None or self.mesh.tp_rank == 0

    # ------------------------------------------------------------------ showing it

    def table(self) -> str:
        """The plan as a table: each parameter group, its global shape, its shards, the group
        reducing its gradient, its pipeline stages (decoder layers of the same shape and placement
        share a row)."""
        m = self.mesh
        rows: dict[tuple, list[int]] = {}
        for p in self.placements.values():
            pattern, index = _layer_pattern(p.name)
            key = (pattern, p.shape, self._shards(p), self._reduction(p), self._stages(p))
            rows.setdefault(key, []).append(index)
        header = ("tensor", "global shape", "shards", "gradient", "stages")
        lines = [(pattern.replace("{}", _ranges(indices)), "x".join(map(str, shape)), shards, reduction, stages)
                 for (pattern, shape, shards, reduction, stages), indices in rows.items()]
        widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        title = (f"parallel plan: world {m.world_size} = pp {m.pp} x dp {m.dp} x tp {m.tp}, ep {m.ep}"
                 f"{', sequence parallel' if self.sequence_parallel else ''}"
                 f"{f', schedule {self.schedule}' if self.schedule else ''}")
        return "\n".join([title, fmt.format(*header).rstrip(), *(fmt.format(*r).rstrip() for r in lines)])

    def strategy_lines(self) -> list[str]:
        """What the builder handed this rank's layers, a line per kind of layer and strategy
        (decoder layers alike share a line); empty on one process, where every layer runs its own."""
        rows: dict[tuple[str, str], list[int]] = {}
        for name, strategy in self.strategies.items():
            pattern, index = _layer_pattern(name)
            rows.setdefault((pattern or "(model)", _describe(strategy)), []).append(index)
        return [f"{pattern.replace('{}', _ranges(indices))}: {text}" for (pattern, text), indices in rows.items()]

    def _shards(self, p: Placement) -> str:
        parts = []
        if p.tp_dim is not None:
            parts.append(f"tp {self.mesh.tp} on dim {p.tp_dim}")
        if p.expert:
            parts.append(f"ep {self.mesh.ep} on dim 0")
        return ", ".join(parts) or "whole"

    def _reduction(self, p: Placement) -> str:
        if not p.parameter:
            return "- (buffer)"
        steps = ["sum tp"] if p.tp_grad_sum else []
        steps.append("sum edp / dp" if p.expert else "mean dp")
        if len(p.holders) > 1:
            steps.append(f"sum pp {','.join(map(str, sorted(p.holders)))}")
        return ", ".join(steps)

    def _stages(self, p: Placement) -> str:
        text = ",".join(map(str, p.stages))
        return text if len(p.holders) == 1 else f"{text} (home pp {p.holders[0]})"


def _describe(strategy: object) -> str:
    """LinearStrategy(gemm=linear, enter=copy, leave=identity): each callable by its name."""
    values = [f"{f.name}={getattr(v, '__name__', None) or repr(v)}"
              for f in fields(strategy) for v in [getattr(strategy, f.name)]]
    return f"{type(strategy).__name__}({', '.join(values)})"


def _layer_pattern(name: str) -> tuple[str, int]:
    """("layers.{}.mlp...", 3) for layers.3.mlp...; (name, -1) outside the decoder layers."""
    match = re.match(r"layers\.(\d+)\.", name)
    if match is None:
        return name, -1
    return "layers.{}." + name[match.end():], int(match.group(1))


def _ranges(indices: list[int]) -> str:
    """[1, 2, 3, 5] -> "1-3,5"."""
    out, start = [], indices[0]
    for prev, cur in zip(indices, indices[1:] + [None]):
        if cur != prev + 1:
            out.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
    return ",".join(out)


# ----------------------------------------------------------------------------- computing it

def plan_layout(cfg: Config, mesh: Mesh) -> ParallelPlan:
    """The plan of `cfg`'s model on `mesh` (sizes and rank; its process groups are not used)."""
    p = cfg.parallel
    with torch.device("meta"):
        model = DeepSeekV3(cfg.model)
    tp_dims = tensor_split_dims(model) if mesh.tp > 1 else {}
    experts = {f"{name}.{w}" for name, m in model.named_modules() if isinstance(m, GroupedExperts)
               for w, _ in m.named_parameters()} if mesh.ep > 1 else set()
    routers = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, Router)}
    # Under sequence parallelism every tensor TP does not split sees this rank's tokens only;
    # without it, expert parallelism has TP ranks route their own slices of the tokens.
    if p.sequence_parallel:
        summed = {n for n, _ in model.named_parameters() if n not in tp_dims and n not in experts}
    elif mesh.ep > 1 and mesh.tp > 1:
        summed = routers
    else:
        summed = set()
    mtp = cfg.model.mtp_depth > 0
    schedule = specs = None
    if mesh.pp > 1:
        schedule = build_schedule(p.pipeline_schedule, mesh.pp, micro_batches_per_step(cfg, mesh.dp))
        specs = stage_specs(cfg.model.num_layers, schedule.n_stages, p.pipeline_layout, mtp)
    parameters = {n for n, _ in model.named_parameters()}
    placements = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        stages, held = (0,), (0,)
        if schedule is not None:
            stages = tuple(parameter_stages(name, specs, mtp))
            held = tuple(holders(name, schedule, specs, mtp))
        placements[name] = Placement(name, tuple(tensor.shape), tp_dims.get(name), name in experts, name in summed,
                                     stages, held, name in parameters and tensor.dim() >= 2, name in parameters)
    return ParallelPlan(mesh, placements, p.sequence_parallel and mesh.tp > 1,
                        p.pipeline_schedule if mesh.pp > 1 else None)


def whole_model_plan(model: DeepSeekV3) -> ParallelPlan:
    """The plan of a single-process model (every tensor whole), bound to `model`."""
    plan = plan_layout(Config(model=model.cfg), Mesh())
    plan.bind(model)
    return plan


def shard(model: nn.Module, plan: ParallelPlan, tensor_parallel: bool, expert_parallel: bool) -> None:
    """Replace (in place) every whole parameter that the plan splits over TP (`tensor_parallel`)
    or EP (`expert_parallel`) by this rank's part of it (a tensor is split by one of them at most)."""
    for name, param in list(model.named_parameters()):
        p = plan.placements[name]
        if (tensor_parallel and p.tp_dim is not None) or (expert_parallel and p.expert):
            owner_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner_name), attr, nn.Parameter(plan.local_part(p, param.detach()).clone()))
