"""FP8 grouped expert GEMMs: per expert e, y_e = x_e W_e^T, with the three GEMMs quantised as in
megads.fp8.linear and per-expert blockwise weight scales. The rows of x are sorted by expert.

Fprop and Dgrad tiles run along the hidden dimension, within one token row, so they do not
depend on the grouping. Wgrad reduces over each expert's own tokens: its 1x128 tiles start at
the expert's first row and never mix experts (each expert's segment is zero-padded to a multiple
of 128), as every expert's gradient is its own GEMM.
"""
from __future__ import annotations

from typing import Any

import torch

from megads.fp8.linear import FP8Recipe, Saved, compute_dtype, no_autocast, pack, unpack
from megads.fp8.quant import QTensor


def fp8_grouped_weight_grad(x_saved: Saved, grad_out: torch.Tensor, layout: Any, recipe: FP8Recipe,
                            in_features: int) -> torch.Tensor:
    """Wgrad of the experts: grad_out [n, N], forward input as saved -> [E, N, K] fp32.
    `layout` is the backend's group layout from forward (see _FP8Grouped)."""
    with no_autocast(grad_out):
        backend = recipe.backend
        x_t = x_saved if isinstance(x_saved, QTensor) else backend.grouped_wgrad_input(x_saved, layout)
        return backend.grouped_wgrad(grad_out, x_t, layout, in_features)


class _FP8Grouped(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, recipe: FP8Recipe) -> torch.Tensor:
        dtype, x_dtype = compute_dtype(x), x.dtype
        x = x.to(dtype)                                                        # [n, K]
        backend = recipe.backend
        with no_autocast(x):
            layout = backend.group_layout(counts, x.shape[0])
            y = backend.grouped_fprop(x, weight, layout, dtype)                # [n, N]
            saved = backend.grouped_wgrad_input(x, layout) if recipe.cache_fp8_activations else x
        ctx.recipe, ctx.layout, ctx.x_dtype = recipe, layout, x_dtype
        ctx.save_for_backward(weight, *pack(saved))
        return y

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        weight, *saved = ctx.saved_tensors
        backend = ctx.recipe.backend
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            with no_autocast(grad_out):
                grad_x = backend.grouped_dgrad(grad_out, weight, ctx.layout, grad_out.dtype).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_w = fp8_grouped_weight_grad(unpack(tuple(saved)), grad_out, ctx.layout, ctx.recipe,
                                             weight.shape[2]).to(weight.dtype)
        return grad_x, grad_w, None, None


class FP8GroupedGemm:
    """Drop-in for `GroupedExperts.grouped_gemm(x, weight, counts)`: x [n, K] sorted by expert,
    weight [E, N, K], counts [E] int64 -> [n, N]."""

    def __init__(self, recipe: FP8Recipe):
        self.recipe = recipe

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return _FP8Grouped.apply(x, weight, counts, self.recipe)

    def __repr__(self) -> str:
        return f"FP8GroupedGemm(backend={self.recipe.backend.name})"
