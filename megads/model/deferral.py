"""Weight-gradient deferral: a GEMM's backward computes its weight gradient now, or hands it on.

The decision sits in the layers' backward passes (Linear's GEMMs, the routed experts' grouped
GEMM, FP8's Wgrad), so the primitive lives beside them in model/; model/ and fp8/ then need nothing
from parallel/. The pipeline's zero-bubble store (parallel/pipeline/zero_bubble.py) only opens
`defer_into` around a B action and runs the queued computations in its W action.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

WeightGrad = tuple[torch.Tensor, Callable[[], torch.Tensor]]   # (weight, the computation of its gradient)

_queue: list[WeightGrad] | None = None        # where deferred computations go now, if anywhere


@contextlib.contextmanager
def defer_into(queue: list[WeightGrad]) -> Iterator[None]:
    """Inside, weight-gradient computations are appended to `queue` instead of run."""
    global _queue
    previous, _queue = _queue, queue
    try:
        yield
    finally:
        _queue = previous


def defer_weight_grad(weight: torch.Tensor, compute: Callable[[], torch.Tensor]) -> bool:
    """Queue `compute()` (the gradient of `weight`) when inside `defer_into`; False (compute it
    now) otherwise."""
    if _queue is None:
        return False
    _queue.append((weight, compute))
    return True


def weight_grad_now_or_later(weight: torch.Tensor, compute: Callable[[], torch.Tensor],
                             accumulate: Callable[[], None] | None = None) -> torch.Tensor | None:
    """The gradient of `weight` for a backward to return: compute() now, or None when the
    computation is deferred, or None when `accumulate()` adds it into the weight's existing fp32
    gradient in place (megads.model.precision's main gradients: no gradient tensor of its own,
    and no gradient hook runs)."""
    if defer_weight_grad(weight, compute):
        return None
    if accumulate is not None:
        accumulate()
        return None
    return compute().to(weight.dtype)
