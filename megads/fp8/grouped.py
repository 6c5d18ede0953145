"""FP8 grouped expert GEMMs: per expert e, y_e = x_e W_e^T, with the three GEMMs quantised as in
megads.fp8.linear and per-expert blockwise weight scales. The rows of x are sorted by expert.

Fprop and Dgrad tiles run along the hidden dimension, within one token row, so they do not
depend on the grouping. Wgrad reduces over each expert's own tokens: its 1x128 tiles start at
the expert's first row and never mix experts (each expert's segment is zero-padded to a
multiple of 128), since every expert's gradient is its own GEMM.
"""
from __future__ import annotations

from typing import Any

import torch

from megads.fp8.linear import FP8Recipe, along_tokens, compute_dtype, no_autocast, restore, save
from megads.fp8.quant import QTensor
from megads.model.deferral import weight_grad_now_or_later


def fp8_grouped_weight_grad(x_saved: torch.Tensor | QTensor, grad_saved: torch.Tensor | QTensor, layout: Any,
                            recipe: FP8Recipe, weight_shape: tuple[int, int, int]) -> torch.Tensor:
    """The experts' Wgrad [E, N, K] fp32 from the forward input [n, K] and the output gradient
    [n, N], each in high precision or already quantised along the tokens; `layout` is the
    backend's group layout that forward made (kept on the autograd context as ctx.layout)."""
    with no_autocast(x_saved):
        g, x = along_tokens(grad_saved, recipe, layout), along_tokens(x_saved, recipe, layout)
        return recipe.backend.grouped_wgrad(g, x, layout, weight_shape[1], weight_shape[2])


class _FP8Grouped(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, recipe: FP8Recipe) -> torch.Tensor:
        backend, (need_dx, need_dw) = recipe.backend, ctx.needs_input_grad[:2]
        dtype, x_dtype = compute_dtype(x), x.dtype
        x = recipe.cast(x, dtype)                                              # [n, K]
        with no_autocast(x):
            layout = recipe.group_layout(counts, x.shape[0])
            x_rows, x_cols = recipe.quantize_act(x, rows=True, cols=need_dw and recipe.cache_fp8_activations,
                                                 layout=layout)
            w_q, w_t = recipe.weight_blocks(weight, transposed=need_dx)
            y = backend.grouped_mm(x_rows, w_q, layout, x.shape[0], weight.shape[1], dtype)   # [n, N]
        ctx.recipe, ctx.layout, ctx.x_dtype, ctx.w_shape = recipe, layout, x_dtype, tuple(weight.shape)
        save(ctx, w_t if need_dx else None, (x_cols if x_cols is not None else x) if need_dw else None,
             weight if need_dw else None)
        return y

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        w_t, x_saved, weight = restore(ctx)
        backend, (need_dx, need_dw) = ctx.recipe.backend, ctx.needs_input_grad[:2]
        with no_autocast(grad_out):
            g_rows, g_cols = backend.quantize_act(grad_out, rows=need_dx, cols=need_dw, layout=ctx.layout)
            grad_x = grad_w = None
            if need_dx:
                grad_x = backend.grouped_mm(g_rows, w_t, ctx.layout, grad_out.shape[0], ctx.w_shape[2],
                                            grad_out.dtype).to(ctx.x_dtype)
        if need_dw:
            layout, recipe, shape = ctx.layout, ctx.recipe, ctx.w_shape
            grad_w = weight_grad_now_or_later(
                weight, lambda: fp8_grouped_weight_grad(x_saved, g_cols, layout, recipe, shape))
        return grad_x, grad_w, None, None


class FP8GroupedGemm:
    """Drop-in for `grouped_linear(x, weight, counts)` as `ExpertsStrategy.gemm`: x [n, K] sorted by expert,
    weight [E, N, K], counts [E] int64 -> [n, N]."""

    def __init__(self, recipe: FP8Recipe):
        self.recipe = recipe

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return _FP8Grouped.apply(x, weight, counts, self.recipe)

    def __repr__(self) -> str:
        return f"FP8GroupedGemm(backend={self.recipe.backend.name})"
