"""The zero-bubble split of backward (Qi et al., "Zero Bubble Pipeline Parallelism", 2023).

While a `WeightGradStore` collects for a (chunk, micro-batch) (`store.collect(key)` around a B
action), a GEMM's backward hands its weight-gradient computation to the store through
megads.model.deferral (`weight_grad_now_or_later`) instead of running it, and returns only the
input gradient. The W action (`store.flush(key)`) runs the queued computations and hands each
result to autograd as the parameter's gradient, so parameter hooks (sequence-parallel
reductions, DeepSpeed's) run as for any gradient.

`DeferredGemm` is the `LinearStrategy.gemm` that does so for the plain product (dx = dy W now,
dW = dy^T x later); any other GEMM (the routed experts' `grouped_linear`, FP8's Wgrad) defers
through `weight_grad_now_or_later` by itself.
"""
from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from megads.model.deferral import WeightGrad, defer_into
from megads.model.layers import Linear, LinearFunction


class WeightGradStore:
    def __init__(self):
        self.queues: dict[tuple[int, int], list[WeightGrad]] = {}
        self.deferred = 0                 # weight-gradient computations run by W actions so far

    @contextlib.contextmanager
    def collect(self, key: tuple[int, int]) -> Iterator[None]:
        """Queue the weight-gradient computations of backward passes run inside under `key`."""
        with defer_into(self.queues.setdefault(key, [])):
            yield

    def flush(self, key: tuple[int, int]) -> None:
        """Run the computations queued under `key` and accumulate their results into .grad."""
        grads: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for weight, compute in self.queues.pop(key, []):
            self.deferred += 1
            g = compute().to(weight.dtype)
            grads[id(weight)] = (weight, grads[id(weight)][1] + g if id(weight) in grads else g)
        if grads:
            params, values = zip(*grads.values())
            torch.autograd.backward(list(params), list(values))

    def pending(self) -> list[tuple[int, int]]:
        return [k for k, v in self.queues.items() if v]


class DeferredGemm:
    """A `LinearStrategy.gemm` (F.linear) whose weight gradient can wait for the schedule's W action."""

    def __repr__(self) -> str:
        return "deferred-wgrad"

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            with torch.autocast(x.device.type, enabled=False):
                weight = weight.to(dtype)
                return LinearFunction.apply(x.to(dtype), weight.to(dtype), None, None)
        return LinearFunction.apply(x, weight, None, None)


def deferred_strategies(model: nn.Module, strategies: dict[str, object]) -> dict[str, object]:
    """Module name -> its strategy with a DeferredGemm, for every `Linear` whose GEMM (in
    `strategies`, else its own) is the plain F.linear. Other GEMMs defer through
    megads.model.deferral by themselves, as do the routed experts' grouped GEMMs."""
    out: dict[str, object] = {}
    for name, module in model.named_modules():
        if isinstance(module, Linear):
            current = strategies.get(name, module.strategy)
            if current.gemm is F.linear:
                out[name] = replace(current, gemm=DeferredGemm())
    return out
