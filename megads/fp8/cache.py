"""Quantised tensors reused instead of recomputed, exactly: a tensor's quantisation is a pure
function of its value, so a result can be reused while the same tensor object keeps the same
`_version`.

WeightCache: the weights' FP8 blocks. With gradient accumulation every micro-batch's forward
multiplies by the same weights, so their 128x128-block quantisation (W for Fprop, W^T for
Dgrad) is done once per optimizer step. An entry is valid while it belongs to the same tensor
object at the same `_version` (bumped by in-place changes through autograd: `copy_` in a
checkpoint load, foreach AdamW). Updates that do not bump it must be followed by `clear()`:
fused AdamW (torch 2.x updates in place without a version bump), `.data` copies (checkpoint
loading, DeepSpeed's bf16 parameters); the Trainer clears after every optimizer step and after
loading a checkpoint. The cost is 2 bytes per
cached parameter.

RecentResults: a shared input's quantisation (and bf16 copy), reused by the projections that
share it.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Any, Callable, Hashable

import torch

from megads.fp8.quant import QTensor

Quantize = Callable[[torch.Tensor], tuple[QTensor, QTensor]]


class WeightCache:
    def __init__(self):
        # id(weight) -> (weakref to the weight, its _version, W blocks, W^T blocks)
        self.entries: dict[int, tuple[weakref.ref, int, QTensor, QTensor]] = {}
        self.quantized = 0                  # quantisations run (misses), for tests and benchmarks

    def get(self, weight: torch.Tensor, quantize: Quantize) -> tuple[QTensor, QTensor]:
        """(W blocks, W^T blocks) of `weight`, from `quantize(weight)` unless cached for its current value."""
        entry = self.entries.get(id(weight))
        if entry is not None and entry[0]() is weight and entry[1] == weight._version:
            return entry[2], entry[3]
        w_q, w_t = quantize(weight)
        self.quantized += 1
        self.entries[id(weight)] = (weakref.ref(weight), weight._version, w_q, w_t)
        return w_q, w_t

    def clear(self) -> None:
        """Forget every entry: call after the weights change (the optimizer step)."""
        self.entries.clear()


class RecentResults:
    """The last few results of a function of one tensor (and hashable options), for inputs used
    twice in a row: the gate and up projections (dense, shared and routed experts) quantise the
    same input, in forward for their Fprop and in backward for their Wgrads."""

    def __init__(self, size: int = 8):
        self.size = size
        self.entries: OrderedDict[tuple, tuple[weakref.ref, int, Any, Any]] = OrderedDict()
        self.hits = 0

    def get(self, x: torch.Tensor, options: Hashable, compute: Callable[[], Any], pin: Any = None) -> Any:
        """compute() (a function of x's value and `options`), or its result for the same x object at
        the same _version. `pin` is kept alive with the entry (an object whose id is in `options`)."""
        if x.is_inference():                # no version counter to key on
            return compute()
        key = (id(x), options)
        entry = self.entries.get(key)
        if entry is not None and entry[0]() is x and entry[1] == x._version:
            self.hits += 1
            self.entries.move_to_end(key)
            return entry[2]
        result = compute()
        self.entries[key] = (weakref.ref(x), x._version, result, pin)
        self.entries.move_to_end(key)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return result

    def clear(self) -> None:
        self.entries.clear()
