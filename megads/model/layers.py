"""megads' own building blocks. Every matrix product of the model goes through `Linear`,
so that tensor parallelism and FP8 are switched on inside it, from outside the model."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    """y = x @ W^T with W [out_features, in_features] (no bias: DeepSeek-V3 has none).

    `gemm(x, weight)` is the local matrix product: FP8 (megads.fp8) and the zero-bubble
    weight-gradient deferral replace it; tensor parallelism wraps communication around it.
    A GEMM's backward decides through megads.model.deferral whether its weight gradient is
    computed now or by the pipeline's W action.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.gemm: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gemm(x, self.weight)

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


class Embedding(nn.Module):
    """Token embedding, weight [vocab, dim]; vocab-parallel sharding plugs in here."""

    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.weight)
