"""Turn a built (and TP/EP-sharded) model into this rank's pipeline stages and their executor."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch.distributed as dist

from megads.config import Config
from megads.model.deepseek_v3 import DeepSeekV3
from megads.parallel.mesh import Mesh
from megads.parallel.pipeline.executor import MirrorSet, PipelineExecutor
from megads.parallel.pipeline.p2p import build_p2p
from megads.parallel.pipeline.placement import holders, keep_stages, stage_specs
from megads.parallel.pipeline.schedules import build_schedule
from megads.parallel.pipeline.zero_bubble import WeightGradStore


def micro_batches_per_step(cfg: Config, dp: int) -> int:
    return cfg.train.global_batch // (dp * cfg.train.micro_batch)


def build_pipeline(model: DeepSeekV3, cfg: Config, mesh: Mesh,
                   autocast: Callable[[], contextlib.AbstractContextManager]) -> PipelineExecutor:
    """Prune `model` to this rank's stages (in place), create the mirror groups (collective: every
    rank calls this), and return the executor of the configured schedule. When the schedule
    splits backward (`schedule.splits_backward`), the model builder gives the plain GEMMs the
    zero-bubble deferral."""
    p, t, m = cfg.parallel, cfg.train, cfg.model
    schedule = build_schedule(p.pipeline_schedule, mesh.pp, micro_batches_per_step(cfg, mesh.dp))
    mtp = m.mtp_depth > 0
    specs = stage_specs(m.num_layers, schedule.n_stages, p.pipeline_layout, mtp)
    holder_sets = {name: tuple(sorted(holders(name, schedule, specs, mtp)))
                   for name in [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_moe_layers()]}
    stage_size = mesh.dp * mesh.tp
    groups = {}
    for ranks in sorted({s for s in holder_sets.values() if len(s) > 1}):
        for i in range(stage_size):
            group = dist.new_group([q * stage_size + i for q in ranks])
            if i == mesh.stage_index and mesh.pp_rank in ranks:
                groups[ranks] = group
    keep_stages(model, schedule, specs, mesh.pp_rank)
    params = sorted(model.named_parameters())
    mirrors = [MirrorSet(group, [q for n, q in params if holder_sets[n] == ranks],
                         [moe for n, moe in model.named_moe_layers() if holder_sets[n] == ranks])
               for ranks, group in groups.items()]
    store = WeightGradStore()
    chunks = {c: specs[schedule.stage_of(mesh.pp_rank, c)] for c in schedule.chunks(mesh.pp_rank)}
    hidden = (t.micro_batch, t.seq_len // (mesh.tp if p.sequence_parallel else 1), m.hidden_size)
    return PipelineExecutor(model, schedule, chunks, mesh.pp_rank, build_p2p(mesh), store, hidden, mirrors,
                            mesh.group("pp"), autocast)
