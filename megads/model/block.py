"""A DeepSeek-V3 decoder layer: pre-norm MLA and pre-norm MLP or MoE, each with a residual."""
from __future__ import annotations

import torch
from torch import nn

from megads.config import ModelConfig
from megads.model.layers import MLP, RMSNorm
from megads.model.mla import MLA
from megads.model.moe import MoE


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if moe else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))
