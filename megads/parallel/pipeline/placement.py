"""Which parts of the model live on which pipeline rank.

Stages split the decoder layers (evenly, or by a layout string); the first stage also holds the
embedding, the last one the final norm, the output head, the loss and the MTP depths (which
need the embedding too). A rank keeps the union of its chunks' stages in one `DeepSeekV3`
whose parameter names stay global (`layers.{i}` ...), and drops the rest.

A parameter held by several pipeline ranks — every parameter under DualPipe (rank r holds
stages r and pp-1-r), the embedding on the last stage when MTP runs away from the first —
is a set of mirrored copies: their gradients are summed over those ranks before the optimizer
step, so the copies stay identical. The parallel plan lists a tensor's holders, its home (the
rank that runs its stage as chunk 0) first: gradient norms and checkpoints count the home copy
only, parameters and buffers (the router bias) alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from megads.config import parse_layout

if TYPE_CHECKING:
    from megads.model.deepseek_v3 import DeepSeekV3
    from megads.parallel.pipeline.schedules import Schedule


@dataclass(frozen=True)
class StageSpec:
    index: int
    layers: tuple[int, ...]
    first: bool
    last: bool


def even_split(num_layers: int, n_stages: int) -> list[int]:
    """Layers per stage, as equal as possible (earlier stages take the remainder)."""
    base, extra = divmod(num_layers, n_stages)
    return [base + (i < extra) for i in range(n_stages)]


def stage_specs(num_layers: int, n_stages: int, layout: str | None, mtp: bool) -> list[StageSpec]:
    counts = parse_layout(layout, num_layers, n_stages, mtp) if layout else even_split(num_layers, n_stages)
    specs, start = [], 0
    for i, n in enumerate(counts):
        specs.append(StageSpec(i, tuple(range(start, start + n)), i == 0, i == n_stages - 1))
        start += n
    return specs


def parameter_stages(name: str, specs: list[StageSpec], mtp: bool) -> list[int]:
    """The stages that use a parameter of the full model, by its global name."""
    head, *rest = name.split(".")
    if head == "layers":
        index = int(rest[0])
        return [s.index for s in specs if index in s.layers]
    if head == "embed_tokens":
        return [specs[0].index] + ([specs[-1].index] if mtp else [])
    return [specs[-1].index]                      # norm, lm_head, mtp


def holders(name: str, schedule: Schedule, specs: list[StageSpec], mtp: bool) -> list[int]:
    """Pipeline ranks holding a parameter, its home first (the rank running its stage as chunk 0)."""
    hops = {hop for path in schedule.paths for s in parameter_stages(name, specs, mtp) for hop in [path[s]]}
    ranks = sorted({r for r, _ in hops}, key=lambda r: (0 if (r, 0) in hops else 1, r))
    return ranks


def keep_stages(model: DeepSeekV3, schedule: Schedule, specs: list[StageSpec], pp_rank: int) -> list[StageSpec]:
    """Drop from `model` (in place) everything this rank's chunks do not use. Returns this rank's
    stage of each chunk."""
    mine = [specs[schedule.stage_of(pp_rank, c)] for c in schedule.chunks(pp_rank)]
    layers = {i for s in mine for i in s.layers}
    for key in [k for k in model.layers if int(k) not in layers]:
        del model.layers[key]
    mtp = len(model.mtp) > 0
    if not any(s.last for s in mine):
        model.norm, model.lm_head = None, None
        model.mtp = type(model.mtp)()
    if not any(s.first for s in mine) and not (mtp and any(s.last for s in mine)):
        model.embed_tokens = None
    return mine
