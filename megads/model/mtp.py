"""Multi-token prediction (DeepSeek-V3 report, 2.2).

Depth k combines the previous depth's hidden state h^{k-1}_i with the embedding of token
t_{i+k}: h'_i = eh_proj(cat(enorm(emb(t_{i+k})), hnorm(h^{k-1}_i))) (embedding first), runs
one decoder layer, and predicts t_{i+k+1} through the shared output head.
"""
from __future__ import annotations

import torch
from torch import nn

from megads.config import ModelConfig
from megads.model.block import DecoderLayer
from megads.model.layers import Linear, RMSNorm


class MTPLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = Linear(2 * cfg.hidden_size, cfg.hidden_size)
        self.layer = DecoderLayer(cfg, moe=cfg.n_routed_experts > 0)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)   # the shared head's own norm

    def forward(self, hidden: torch.Tensor, embedded: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """hidden [b, s, d] from depth k-1; embedded [b, s, d] = emb(t_{i+k}). Returns h^k [b, s, d]."""
        h = self.eh_proj(torch.cat([self.enorm(embedded), self.hnorm(hidden)], dim=-1))
        return self.layer(h, cos, sin)
