"""FP8 linear layers with all three GEMMs in FP8 (DeepSeek-V3 report, 3.3.1, Figure 6).

    Fprop  y  = x W^T        x in 1x128 tiles along K,       W in 128x128 blocks
    Dgrad  dx = dy W         dy in 1x128 tiles along N,      W^T in 128x128 blocks (the same blocks)
    Wgrad  dW = dy^T x       dy^T and x^T in 1x128 tiles along the tokens M

Accumulation is fp32; outputs take the compute dtype (the autocast dtype under autocast, else
the input's, as F.linear), the weight gradient is fp32 like the master weight. The weight's FP8
blocks (W and W^T) come from the recipe's WeightCache: quantised from the fp32 weight once per
optimizer step and shared by all micro-batches. Forward keeps W^T for Dgrad and saves the input
in the compute dtype, or, with `cache_fp8_activations`, already quantised for Wgrad (half the
bytes; report, 3.3.3). Backward quantises the output gradient for both of its GEMMs in one pass.

Wgrad is `fp8_weight_grad`, a separate function: while a zero-bubble WeightGradStore collects,
backward hands it to `defer_weight_grad` and returns only the input gradient.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Union

import torch

from megads.fp8.cache import RecentResults, WeightCache
from megads.fp8.emulated import EmulatedBackend
from megads.fp8.quant import QTensor, crop
from megads.model.deferral import weight_grad_now_or_later

if TYPE_CHECKING:   # imported lazily at run time: it needs Triton
    from megads.fp8.torch_backend import TorchBackend

Saved = Union[torch.Tensor, QTensor, None]


@dataclass(frozen=True)
class FP8Recipe:
    """What every FP8 GEMM of a model shares: the backend, the options and the caches of quantised
    tensors (`clear()` them after each optimizer step)."""

    backend: EmulatedBackend | TorchBackend
    cache_fp8_activations: bool = False
    cache_weights: bool = True
    weights: WeightCache = field(default_factory=WeightCache)
    recent: RecentResults = field(default_factory=RecentResults)

    def weight_blocks(self, weight: torch.Tensor, transposed: bool) -> tuple[QTensor, QTensor | None]:
        """(128x128 blocks of weight [.., N, K], blocks of its transpose if `transposed` or cached)."""
        if not self.cache_weights:
            return self.backend.quantize_weight(weight, forward=True, transposed=transposed)
        return self.weights.get(weight, lambda w: self.backend.quantize_weight(w, forward=True, transposed=True))

    def cast(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """x in the compute dtype; the same copy for a shared input (norm outputs arrive in fp32 under
        autocast), so that its quantisations and its saved copy are shared too."""
        return x if x.dtype == dtype else self.recent.get(x, ("cast", dtype), lambda: x.to(dtype))

    def quantize_act(self, x: torch.Tensor, rows: bool, cols: bool,
                     layout=None) -> tuple[QTensor | None, QTensor | None]:
        """backend.quantize_act of x [..., C] flattened to [R, C]; reused when the same tensor comes
        again with the same options (a shared input of two projections)."""
        def compute():
            return self.backend.quantize_act(x.reshape(-1, x.shape[-1]), rows=rows, cols=cols, layout=layout)
        return self.recent.get(x, ("act", rows, cols, id(layout)), compute, pin=layout)

    def group_layout(self, counts: torch.Tensor, n: int):
        """backend.group_layout, shared by the GEMMs of one expert layer (the same `counts`)."""
        return self.recent.get(counts, ("layout", n), lambda: self.backend.group_layout(counts, n))

    def clear(self) -> None:
        """Forget every cached quantisation: the weights changed (after an optimizer step)."""
        self.weights.clear()
        self.recent.clear()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """What F.linear would compute in: the autocast dtype when autocast is on, else x's dtype."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def no_autocast(t: torch.Tensor | QTensor) -> contextlib.AbstractContextManager:
    """Autocast off on t's device: the FP8 code chooses its dtypes itself."""
    device = (t.data if isinstance(t, QTensor) else t).device
    return torch.autocast(device.type, enabled=False)


def save(ctx, *items: Saved) -> None:
    """ctx.save_for_backward for tensors, QTensors and Nones; `restore` gives them back."""
    parts = [tuple(item) if isinstance(item, QTensor) else (item,) for item in items]
    ctx.saved_sizes = [len(p) for p in parts]
    ctx.save_for_backward(*(t for p in parts for t in p))


def restore(ctx) -> list[Saved]:
    tensors, items = list(ctx.saved_tensors), []
    for size in ctx.saved_sizes:
        part, tensors = tensors[:size], tensors[size:]
        items.append(QTensor(*part) if size == 2 else part[0])
    return items


def along_tokens(t: torch.Tensor | QTensor, recipe: FP8Recipe, layout=None) -> QTensor:
    """[M, C] -> its transpose in 1x128 tiles along the tokens M (already so when a QTensor)."""
    return t if isinstance(t, QTensor) else recipe.quantize_act(t, rows=False, cols=True, layout=layout)[1]


def fp8_weight_grad(x_saved: torch.Tensor | QTensor, grad_saved: torch.Tensor | QTensor, recipe: FP8Recipe,
                    weight_shape: tuple[int, int]) -> torch.Tensor:
    """Wgrad, grad^T x [N, K] fp32. x_saved is the forward input [..., K] and grad_saved the output
    gradient [..., N] (the same leading dims), each in high precision or already quantised along the
    tokens (QTensor)."""
    with no_autocast(x_saved):
        g, x = along_tokens(grad_saved, recipe), along_tokens(x_saved, recipe)
        return crop(recipe.backend.mm(g, x, torch.float32), *weight_shape)


class _FP8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, recipe: FP8Recipe) -> torch.Tensor:
        backend, (need_dx, need_dw) = recipe.backend, ctx.needs_input_grad[:2]
        dtype = compute_dtype(x)
        xc = recipe.cast(x, dtype)                                             # [..., K]
        m = xc.numel() // xc.shape[-1]
        with no_autocast(x):
            x_rows, x_cols = recipe.quantize_act(xc, rows=True, cols=need_dw and recipe.cache_fp8_activations)
            w_q, w_t = recipe.weight_blocks(weight, transposed=need_dx)
            y = crop(backend.mm(x_rows, w_q, dtype), m, weight.shape[0])       # [M, N]
        ctx.recipe, ctx.x_shape, ctx.x_dtype, ctx.w_shape = recipe, x.shape, x.dtype, tuple(weight.shape)
        save(ctx, w_t if need_dx else None, (x_cols if x_cols is not None else xc) if need_dw else None,
             weight if need_dw else None)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        w_t, x_saved, weight = restore(ctx)
        backend, (need_dx, need_dw) = ctx.recipe.backend, ctx.needs_input_grad[:2]
        grad = grad_out.reshape(-1, grad_out.shape[-1])                        # [M, N]
        with no_autocast(grad):
            g_rows, g_cols = backend.quantize_act(grad, rows=need_dx, cols=need_dw)
            grad_x = grad_w = None
            if need_dx:
                grad_x = crop(backend.mm(g_rows, w_t, grad.dtype), grad.shape[0], ctx.w_shape[1])
                grad_x = grad_x.reshape(ctx.x_shape).to(ctx.x_dtype)
        if need_dw:
            recipe, shape = ctx.recipe, ctx.w_shape
            grad_w = weight_grad_now_or_later(weight, lambda: fp8_weight_grad(x_saved, g_cols, recipe, shape))
        return grad_x, grad_w, None


class FP8Gemm:
    """Drop-in for F.linear(x, weight) (no bias) as `LinearStrategy.gemm`: x [..., K], weight [N, K] -> [..., N]."""

    def __init__(self, recipe: FP8Recipe):
        self.recipe = recipe

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return _FP8Linear.apply(x, weight, self.recipe)

    def __repr__(self) -> str:
        return f"FP8Gemm(backend={self.recipe.backend.name})"
