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
