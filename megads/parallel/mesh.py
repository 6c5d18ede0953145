"""The process mesh: world = PP x DP x TP, TP fastest, then DP, then PP.

    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

so TP peers are neighbours (one node) and pipeline stages span nodes. Expert parallelism
reuses the dp * tp ranks of one stage ("stage-local index" i = dp_rank * tp + tp_rank): the EP
group is a block of `ep` consecutive stage-local ranks, and ranks at the same position in
every block form the expert-data-parallel (EDP) group that reduces expert gradients.
Dense parameters reduce over DP; expert parameters over EDP.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist

from megads.config import ConfigError, ParallelConfig


@dataclass
class Mesh:
    world_size: int = 1
    rank: int = 0
    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1
    groups: dict = field(default_factory=dict, repr=False)   # name -> ProcessGroup, also of one rank
    ranks: dict = field(default_factory=dict, repr=False)    # name -> ranks of this rank's group

    @property
    def edp(self) -> int:
        return self.dp * self.tp // self.ep

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.dp)

    @property
    def stage_index(self) -> int:
        """Index among the dp * tp ranks of this pipeline stage."""
        return self.rank % (self.tp * self.dp)

    @property
    def ep_rank(self) -> int:
        return self.stage_index % self.ep

    @property
    def edp_rank(self) -> int:
        return self.stage_index // self.ep

    def group(self, name: str):
        """The process group `name` (tp, dp, pp, mp, stage, ep, edp), or None when it has one rank."""
        return self.groups.get(name) if self.size(name) > 1 else None

    def process_group(self, name: str):
        """The process group `name` even when it has one rank (for libraries that need a group)."""
        return self.groups[name]

    def size(self, name: str) -> int:
        return len(self.ranks.get(name, [self.rank]))


def layout_ranks(world_size: int, tp: int, pp: int, ep: int) -> dict[str, list[list[int]]]:
    """Every group of every kind, as rank lists (pure: no process groups are created)."""
    dp = world_size // (tp * pp)
    stage = tp * dp
    kinds: dict[str, list[list[int]]] = {k: [] for k in ("tp", "dp", "pp", "mp", "stage", "ep", "edp")}
    for p in range(pp):
        base = p * stage
        kinds["stage"].append(list(range(base, base + stage)))
        for d in range(dp):
            kinds["tp"].append([base + d * tp + t for t in range(tp)])
        for t in range(tp):
            kinds["dp"].append([base + d * tp + t for d in range(dp)])
        for block in range(stage // ep):
            kinds["ep"].append([base + block * ep + e for e in range(ep)])
        for e in range(ep):
            kinds["edp"].append([base + block * ep + e for block in range(stage // ep)])
    for i in range(stage):
        kinds["pp"].append([p * stage + i for p in range(pp)])
    for d in range(dp):                    # model parallel = TP x PP: everything one replica holds
        kinds["mp"].append([p * stage + d * tp + t for p in range(pp) for t in range(tp)])
    return kinds


def layout_mesh(cfg: ParallelConfig, world_size: int, rank: int = 0) -> Mesh:
    """The sizes and this rank's place of `cfg`'s layout on `world_size` ranks, without process
    groups (for plans and checks made before any process starts)."""
    if world_size % (cfg.tp * cfg.pp):
        raise ConfigError(f"world size {world_size} is not divisible by parallel.tp * parallel.pp = {cfg.tp * cfg.pp}")
    return Mesh(world_size=world_size, rank=rank, tp=cfg.tp, pp=cfg.pp, dp=world_size // (cfg.tp * cfg.pp), ep=cfg.ep)


def build_mesh(cfg: ParallelConfig) -> Mesh:
    """Create every process group (collectively: all ranks call this in the same order)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    mesh = layout_mesh(cfg, world, rank)
    for name, groups in layout_ranks(world, cfg.tp, cfg.pp, cfg.ep).items():
        for ranks in groups:
            group = dist.new_group(ranks) if world > 1 else None
            if rank in ranks:
                mesh.ranks[name], mesh.groups[name] = ranks, group
    return mesh
