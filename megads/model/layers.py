"""megads' own building blocks. Every matrix product of the model goes through `Linear`,
so that tensor parallelism and FP8 are switched on inside it, from outside the model.

A layer whose behaviour a parallelism changes has one `strategy`: a frozen dataclass of the
callables its forward runs, the single-process ones by default. Only the model builder
(megads.parallel.builder) hands a layer another one, as the layout's plan declares it
(`python -m megads.pretrain CONFIG --print-plan` lists them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from megads.model.deferral import weight_grad_now_or_later

Gemm = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]     # (x [..., in], weight [out, in]) -> [..., out]
Region = Callable[[torch.Tensor], torch.Tensor]                  # a communication boundary; identity on one process


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass(frozen=True)
class LinearStrategy:
    """y = leave(gemm(enter(x), W)). Tensor parallelism sets `enter` (copy or sequence gather into
    a column-parallel layer) and `leave` (all-reduce or reduce-scatter out of a row-parallel one);
    FP8 and the zero-bubble weight-gradient deferral set `gemm`."""
    gemm: Gemm = F.linear
    enter: Region = identity
    leave: Region = identity


def linear_weight_grad(x: torch.Tensor, dy: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """dW = dy^T x over all leading dimensions, in `dtype` (fp32 from bf16 operands is one GEMM
    with an fp32 output on GPU). x [..., K], dy [..., N] -> [N, K]."""
    dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1]).to(dy.dtype)
    if dtype == dy.dtype:
        return dy2.t().mm(x2)
    if dy.is_cuda:
        return torch.mm(dy2.t(), x2, out_dtype=dtype)
    return dy2.t().to(dtype).mm(x2.to(dtype))


def add_linear_weight_grad(main_grad: torch.Tensor, x: torch.Tensor, dy: torch.Tensor) -> None:
    """main_grad [N, K] (fp32) += dy^T x, the GEMM accumulating into it in place (on GPU one
    addmm with bf16 operands and fp32 output, as Megatron's gradient-accumulation fusion; in a
    compiled graph an fp32-output mm and an add, since tracing that addmm's `out=` form failed on
    the GPU: benchmarks/RESULTS.md)."""
    dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1]).to(dy.dtype)
    if not dy.is_cuda or dy.dtype == main_grad.dtype:
        main_grad.addmm_(dy2.t().to(main_grad.dtype), x2.to(main_grad.dtype))
    elif torch.compiler.is_compiling():
        main_grad.add_(torch.mm(dy2.t(), x2, out_dtype=main_grad.dtype))
    else:
        torch.addmm(main_grad, dy2.t(), x2, out_dtype=main_grad.dtype, out=main_grad)


class LinearFunction(torch.autograd.Function):
    """y = x W^T, where W is `copy` (the parameter `param` in the compute dtype) or, when `copy` is
    None, `param` itself (never pass one tensor twice: a compiled graph merges duplicate inputs and
    their gradients with them). The weight gradient (dy^T x in param's dtype) goes to `param`: now,
    at the pipeline's W action (megads.model.deferral), or, when `main_grad` (param's fp32 .grad)
    is given, added into it by the GEMM in place. x [..., K], param / copy [N, K] -> [..., N]."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, param: torch.Tensor, copy: torch.Tensor | None,
                main_grad: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, param, copy)
        ctx.main_grad = main_grad           # not saved: other GEMMs of the step add into it meanwhile
        return F.linear(x, param if copy is None else copy)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, param, copy = ctx.saved_tensors
        weight = param if copy is None else copy
        dx = dy.matmul(weight.to(dy.dtype)).to(x.dtype) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:
            main_grad = ctx.main_grad
            accumulate = None if main_grad is None else lambda: add_linear_weight_grad(main_grad, x, dy)
            dw = weight_grad_now_or_later(param, lambda: linear_weight_grad(x, dy, param.dtype), accumulate)
        return dx, dw, None, None


class Linear(nn.Module):
    """y = x @ W^T with W [out_features, in_features] (no bias: DeepSeek-V3 has none), run as its
    `strategy` says. A GEMM's backward decides through megads.model.deferral whether its weight
    gradient is computed now or by the pipeline's W action."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.strategy = LinearStrategy()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.strategy
        return s.leave(s.gemm(s.enter(x), self.weight))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, returned in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Used for dense layers and shared experts."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.gate_proj = Linear(dim, inter_dim)
        self.up_proj = Linear(dim, inter_dim)
        self.down_proj = Linear(inter_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass(frozen=True)
class EmbeddingStrategy:
    """`lookup(tokens [b, s], weight [vocab, d]) -> [b, s, d]`; vocabulary parallelism looks up
    this rank's rows and sums the partial results."""
    lookup: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.embedding


class Embedding(nn.Module):
    """Token embedding, weight [vocab, dim]."""

    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim))
        self.strategy = EmbeddingStrategy()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.strategy.lookup(tokens, self.weight)
