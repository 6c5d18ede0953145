"""A DeepSeek-V3 decoder layer: pre-norm MLA and pre-norm MLP or MoE, each with a residual."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import nn

from megads.config import ModelConfig
from megads.model.layers import MLP, RMSNorm
from megads.model.mla import MLA, LatentCache
from megads.model.moe import Dispatched, MoE
from megads.model.recompute import run_directly


class Piece(NamedTuple):
    """One step of a layer's forward; `fn` maps the previous piece's output to this one's."""
    name: str
    communicates: bool           # holds the expert all-to-all (overlapped with another micro-batch's computation)
    fn: Callable


@dataclass(frozen=True)
class DecoderLayerStrategy:
    """`run(fn, *args)`: how the layer's forward runs, directly or under activation recompute
    (megads.model.recompute, `train.recompute`)."""
    run: Callable = run_directly


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if moe else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.strategy = DecoderLayerStrategy()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LatentCache | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        return self.strategy.run(self.layer_forward, x, cos, sin, cache, positions)

    def layer_forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LatentCache | None = None,
                      positions: torch.Tensor | None = None) -> torch.Tensor:
        """x + MLA(norm(x)), then the same with the MLP or MoE; x [b, s, d] -> [b, s, d]."""
        return self.feed_forward(self.attend(x, cos, sin, cache, positions))

    def pieces(self, cos: torch.Tensor, sin: torch.Tensor) -> list[Piece]:
        """The forward as a chain, for a pipeline's overlapped F&B action to interleave with another
        micro-batch's backward: attention, then the MLP, or the MoE's dispatch (routing and the
        all-to-all to the experts' ranks), experts (routed and shared) and combine (the all-to-all
        back and the residual). [b, s, d] -> ... -> [b, s, d]"""
        attention = Piece("attention", False, lambda x: self.attend(x, cos, sin))
        if not isinstance(self.mlp, MoE):
            return [attention, Piece("mlp", False, self.feed_forward)]
        return [attention, Piece("dispatch", True, self.dispatch), Piece("experts", False, self.mlp.run_experts),
                Piece("combine", True, self.combine)]

    def attend(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LatentCache | None = None,
               positions: torch.Tensor | None = None) -> torch.Tensor:
        """x + MLA(norm(x)); x [b, s, d]."""
        return x + self.self_attn(self.input_layernorm(x), cos, sin, cache, positions)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """x + MLP(norm(x)) or x + MoE(norm(x)); x [b, s, d]."""
        return x + self.mlp(self.post_attention_layernorm(x))

    def dispatch(self, x: torch.Tensor) -> Dispatched:
        """The MoE's dispatch on norm(x), carrying x as the residual; x [b, s, d]."""
        st = self.mlp.dispatch(self.post_attention_layernorm(x))
        st.residual = x
        return st

    def combine(self, st: Dispatched) -> torch.Tensor:
        """x + MoE(norm(x)) from the dispatched tokens after the experts ran. -> [b, s, d]"""
        return st.residual + self.mlp.combine(st)
