"""Activation recompute (`train.recompute`): a decoder layer keeps fewer of its activations for
backward and computes the rest again when backward needs them (torch.utils.checkpoint,
non-reentrant, with a per-operator policy as torchtitan's selective checkpointing).

    none       every activation kept
    selective  the outputs of the expensive operators kept: GEMMs (dense, grouped, FP8) and
               attention; the cheap, memory-heavy ones recomputed: norms and their fp32
               intermediates, rope, SwiGLU's activation and product, dtype casts, the MoE's
               gather / combine (Megatron's recompute modules: layernorm, moe_act, mla_up_proj's
               element-wise parts)
    full       only the layer's input kept; everything recomputed, GEMMs included

Both keep the routing decision (the router's top-k, the expert sort and counts): the recomputed
forward sends every token to the experts the original forward chose, whatever a kernel's rounding,
so the recomputed tensors have the shapes autograd saved. A forward also counts statistics (the
MoE's expert loads); `recomputing()` is true while a forward runs again, so they count once.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

aten = torch.ops.aten

ROUTING_OPS = frozenset({aten.topk.default, aten.sort.default, aten.sort.stable, aten.argsort.default,
                         aten.argsort.stable, aten.bincount.default})
EXPENSIVE_OPS = frozenset({aten.mm.default, aten.addmm.default, aten.bmm.default, aten._grouped_mm.default,
                           aten._scaled_mm.default, aten._scaled_grouped_mm.default,
                           aten._scaled_dot_product_cudnn_attention.default,
                           aten._scaled_dot_product_flash_attention.default,
                           aten._scaled_dot_product_efficient_attention.default,
                           aten._scaled_dot_product_flash_attention_for_cpu.default})

_recomputing = False


def recomputing() -> bool:
    """True while a checkpointed forward runs again in backward."""
    return _recomputing


@contextlib.contextmanager
def _marked_recomputing(policy_context: contextlib.AbstractContextManager) -> Iterator[None]:
    global _recomputing
    with policy_context:
        previous, _recomputing = _recomputing, True
        try:
            yield
        finally:
            _recomputing = previous


def run_directly(fn: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    return fn(*args)


@dataclass(frozen=True)
class Recompute:
    """A decoder layer's `run`: fn(*args) under a checkpoint that keeps the outputs of `kept`
    operators and recomputes every other one in backward."""
    name: str
    kept: frozenset

    def __repr__(self) -> str:
        return f"recompute-{self.name}"

    def __call__(self, fn: Callable[..., torch.Tensor], *args) -> torch.Tensor:
        return checkpoint(fn, *args, use_reentrant=False, context_fn=functools.partial(_contexts, self.kept))


def _contexts(kept: frozenset) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """The checkpoint's contexts for the original forward and for its recomputation."""
    def policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
        return CheckpointPolicy.MUST_SAVE if op in kept else CheckpointPolicy.PREFER_RECOMPUTE
    original, again = create_selective_checkpoint_contexts(policy)
    if torch.compiler.is_compiling():        # a traced region: recomputed in the graph, no Python runs again
        return original, again
    return original, _marked_recomputing(again)


def recompute_run(setting: str) -> Callable:
    """The `run` of `train.recompute` = none | selective | full."""
    if setting == "none":
        return run_directly
    return Recompute(setting, ROUTING_OPS | (EXPENSIVE_OPS if setting == "selective" else frozenset()))
