"""AdamW state per parameter, whichever optimizer step owns it.

`LocalOptimizer` keeps torch AdamW state per local parameter. DeepSpeed ZeRO-1/2 keeps it on
flat fp32 partitions spread over the (expert-)data-parallel group; its tensor-fragment API
gathers the full state of one parameter (a collective over that group) and writes a full
value back into the local fragment. Either way the checkpoint sees one moment tensor per
local parameter, shaped like it, plus the number of Adam steps taken (bias correction).
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn

from megads.checkpoint.layout import MOMENTS
from megads.parallel.data import DeepSpeedOptimizer
from megads.parallel.deepspeed_adapter import link_optimizer_fragments


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _zero(stepper):
    return stepper.optimizer if isinstance(stepper, DeepSpeedOptimizer) else None


def adam_step(stepper) -> int:
    """Adam steps taken so far (0 before the first update; the moments then do not exist)."""
    zero = _zero(stepper)
    state = zero.optimizer.state if zero is not None else stepper.optimizer.state
    for value in state.values():
        return int(value["step"])
    return 0


def moments(stepper, model: nn.Module) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """(local parameter name, {exp_avg, exp_avg_sq} of the local shape), one parameter at a time;
    nothing before the first update. Under ZeRO each item is a collective over the parameter's
    data-parallel group: iterate on every rank of the stage, in full."""
    if adam_step(stepper) == 0:
        return
    zero = _zero(stepper)
    if zero is not None:
        from deepspeed.utils import safe_get_full_optimizer_state
        link_optimizer_fragments(zero)
        for n, p in trainable(model):
            yield n, {m: safe_get_full_optimizer_state(p, m).reshape(p.shape) for m in MOMENTS}
        return
    state = stepper.optimizer.state
    for n, p in trainable(model):
        yield n, {m: state[p][m] for m in MOMENTS}


def set_moments(stepper, model: nn.Module, step: int,
                read: Callable[[str, str, nn.Parameter], torch.Tensor]) -> None:
    """Install Adam state: `step` updates taken and read(local name, moment, param) for each moment."""
    zero = _zero(stepper)
    optimizer = zero.optimizer if zero is not None else stepper.optimizer
    for group in optimizer.param_groups:
        on_device = group.get("fused") or group.get("capturable")
        for p in group["params"]:
            optimizer.state[p] = {"step": torch.tensor(float(step), dtype=torch.float32,
                                                       device=p.device if on_device else "cpu"),
                                  **{m: torch.zeros_like(p, memory_format=torch.preserve_format) for m in MOMENTS}}
    if zero is not None:
        from deepspeed.utils import safe_set_full_optimizer_state
        link_optimizer_fragments(zero)
        for name, p in trainable(model):
            for m in MOMENTS:
                safe_set_full_optimizer_state(p, read(name, m, p).to(p.device, torch.float32), m)
        return
    for name, p in trainable(model):
        for m in MOMENTS:
            optimizer.state[p][m].copy_(read(name, m, p))


def refresh_master_weights(stepper) -> None:
    """After new values were copied into the model's parameters: update ZeRO's fp32 partitions."""
    zero = _zero(stepper)
    if zero is not None:
        zero.refresh_fp32_params()
