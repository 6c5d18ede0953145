"""A DeepSeek-V3 decoder layer: pre-norm MLA and pre-norm MLP or MoE, each with a residual."""
from __future__ import annotations

import torch
from torch import nn

from megads.config import ModelConfig
from megads.model.layers import MLP, RMSNorm
from megads.model.mla import MLA, LatentCache
from megads.model.moe import MoE


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if moe else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LatentCache | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        return self.feed_forward(self.attend(x, cos, sin, cache, positions))

    # The layer's two pieces, which a pipeline's overlapped F&B action interleaves with another
    # micro-batch's backward: attention, then the MLP / MoE (routing, dispatch, experts, combine).

    def attend(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LatentCache | None = None,
               positions: torch.Tensor | None = None) -> torch.Tensor:
        """x + MLA(norm(x)); x [b, s, d]."""
        return x + self.self_attn(self.input_layernorm(x), cos, sin, cache, positions)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """x + MLP(norm(x)) or x + MoE(norm(x)); x [b, s, d]."""
        return x + self.mlp(self.post_attention_layernorm(x))
