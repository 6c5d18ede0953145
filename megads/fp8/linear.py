"""FP8 linear layers with all three GEMMs in FP8 (DeepSeek-V3 report, 3.3.1, Figure 6).

    Fprop  y  = x W^T        x in 1x128 tiles along K,       W in 128x128 blocks
    Dgrad  dx = dy W         dy in 1x128 tiles along N,      W^T in 128x128 blocks
    Wgrad  dW = dy^T x       dy^T and x^T in 1x128 tiles along the tokens M

Accumulation is fp32; outputs take the compute dtype (the autocast dtype under autocast, else
the input's), the weight gradient is fp32 like the master weight. The weight is quantised from
the fp32 master in forward and again in backward, so nothing weight-sized is kept between them.
Forward saves the input in the compute dtype, or, with `cache_fp8_activations`, already
quantised for Wgrad (half the bytes; report, 3.3.3).

`fp8_input_grad` and `fp8_weight_grad` are the two halves of backward as separate functions,
so that the zero-bubble schedule can run the weight gradient later.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

import torch

from megads.fp8.emulated import EmulatedBackend
from megads.fp8.quant import QTensor

if TYPE_CHECKING:   # imported lazily at run time: it needs Triton
    from megads.fp8.torch_backend import TorchBackend

Saved = Union[torch.Tensor, QTensor]


@dataclass(frozen=True)
class FP8Recipe:
    backend: EmulatedBackend | TorchBackend
    cache_fp8_activations: bool = False


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """What F.linear would compute in: the autocast dtype when autocast is on, else x's dtype."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def no_autocast(x: torch.Tensor) -> contextlib.AbstractContextManager:
    return torch.autocast(x.device.type, enabled=False)


def pack(saved: Saved) -> tuple[torch.Tensor, ...]:
    return tuple(saved) if isinstance(saved, QTensor) else (saved,)


def unpack(tensors: tuple[torch.Tensor, ...]) -> Saved:
    return QTensor(*tensors) if len(tensors) == 2 else tensors[0]


def fp8_input_grad(grad_out: torch.Tensor, weight: torch.Tensor, recipe: FP8Recipe) -> torch.Tensor:
    """Dgrad: grad_out [M, N], weight [N, K] -> grad_out W [M, K] in grad_out's dtype."""
    with no_autocast(grad_out):
        return recipe.backend.dgrad(grad_out, weight, grad_out.dtype)


def fp8_weight_grad(x_saved: Saved, grad_out: torch.Tensor, recipe: FP8Recipe, in_features: int) -> torch.Tensor:
    """Wgrad: grad_out [M, N] and the forward input as saved ([M, K], or its quantisation along the
    tokens when cache_fp8_activations) -> grad_out^T x [N, K] fp32."""
    with no_autocast(grad_out):
        x_t = x_saved if isinstance(x_saved, QTensor) else recipe.backend.wgrad_input(x_saved)
        return recipe.backend.wgrad(grad_out, x_t, in_features)


class _FP8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, recipe: FP8Recipe) -> torch.Tensor:
        dtype = compute_dtype(x)
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)                              # [M, K]
        with no_autocast(x):
            y = recipe.backend.fprop(x2, weight, dtype)                        # [M, N]
            saved = recipe.backend.wgrad_input(x2) if recipe.cache_fp8_activations else x2
        ctx.recipe, ctx.x_shape, ctx.x_dtype = recipe, x.shape, x.dtype
        ctx.save_for_backward(weight, *pack(saved))
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        weight, *saved = ctx.saved_tensors
        grad = grad_out.reshape(-1, grad_out.shape[-1])                        # [M, N]
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = fp8_input_grad(grad, weight, ctx.recipe).reshape(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_w = fp8_weight_grad(unpack(tuple(saved)), grad, ctx.recipe, weight.shape[1]).to(weight.dtype)
        return grad_x, grad_w, None


class FP8Gemm:
    """Drop-in for F.linear(x, weight) (no bias) as `Linear.gemm`: x [..., K], weight [N, K] -> [..., N]."""

    def __init__(self, recipe: FP8Recipe):
        self.recipe = recipe

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return _FP8Linear.apply(x, weight, self.recipe)

    def __repr__(self) -> str:
        return f"FP8Gemm(backend={self.recipe.backend.name})"
