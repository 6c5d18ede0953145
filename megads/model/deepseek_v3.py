"""The DeepSeek-V3 model: embedding, decoder layers (dense first, then MoE), final norm, output
head, and optional multi-token-prediction depths sharing the embedding and head."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from megads.config import ModelConfig
from megads.model.block import DecoderLayer
from megads.model.head_loss import linear_cross_entropy
from megads.model.layers import Embedding, Linear, RMSNorm
from megads.model.mla import LatentCache
from megads.model.moe import MoE, GroupedExperts, Router
from megads.model.mtp import MTPLayer
from megads.model.rope import rope_cos_sin


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, targets, reduction="none")


@dataclass(frozen=True)
class OutputStrategy:
    """`token_losses(logits [n, vocab], targets [n]) -> [n]`: per-token cross-entropy; vocabulary-
    parallel (logits [n, vocab/tp]) under tensor parallelism. `fused_head`: the training losses
    take the output head and the cross-entropy in one, a chunk of tokens at a time
    (megads.model.head_loss), instead of all tokens' logits then `token_losses`."""
    token_losses: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = token_cross_entropy
    fused_head: bool = False


@dataclass
class ModelOutput:
    loss: torch.Tensor          # lm_loss + mtp_weight * mtp_loss (the balance loss enters through backward)
    lm_loss: torch.Tensor
    mtp_loss: torch.Tensor      # mean over depths; 0 without MTP


class DeepSeekV3(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        # Keys are global layer indices, so a pipeline stage can hold a subset under the same names.
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, moe=i >= cfg.first_k_dense)
                                     for i in range(cfg.num_layers)})
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        self.mtp = nn.ModuleDict({str(k): MTPLayer(cfg) for k in range(cfg.mtp_depth)})
        self.strategy = OutputStrategy()
        self._rope_cache: dict = {}

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Normal(0, init_std) for every matrix, ones for norms, zero router bias."""
        for module in self.modules():
            if isinstance(module, (Linear, Embedding, Router)):
                module.weight.normal_(0.0, self.cfg.init_std, generator=generator)
            elif isinstance(module, GroupedExperts):
                for w in (module.gate_proj, module.up_proj, module.down_proj):
                    w.normal_(0.0, self.cfg.init_std, generator=generator)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            if isinstance(module, Router):
                module.e_score_correction_bias.zero_()

    def token_losses(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-token cross-entropy of logits [n, vocab (shard)] against targets [n] -> [n]."""
        return self.strategy.token_losses(logits, targets)

    def head_token_losses(self, normed: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-token cross-entropy of the output head on normed hidden states [b, s, d] against
        targets [b, s] -> [b * s] fp32."""
        if self.strategy.fused_head:
            return linear_cross_entropy(normed.flatten(0, 1), self.lm_head.weight, targets.flatten())
        return self.token_losses(self.lm_head(normed).flatten(0, 1).float(), targets.flatten())

    def moe_layers(self) -> list[MoE]:
        return [m for _, m in self.named_moe_layers()]

    def named_moe_layers(self) -> list[tuple[str, MoE]]:
        """("layers.3", moe), ..., ("mtp.0", moe): each MoE block by the layer that holds it."""
        return [(name.rsplit(".mlp", 1)[0].replace(".layer", ""), m) for name, m in self.named_modules()
                if isinstance(m, MoE)]

    def rope(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (seq_len, device)
        if key not in self._rope_cache:
            self._rope_cache = {key: rope_cos_sin(self.cfg, seq_len, device)}
        return self._rope_cache[key]

    def hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [b, s] -> last decoder layer's output [b, s, d] (before the final norm)."""
        cos, sin = self.rope(tokens.shape[1], tokens.device)
        h = self.embed_tokens(tokens)
        for layer in self.layers.values():
            h = layer(h, cos, sin)
        return h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))

    def new_cache(self, batch: int, max_len: int, device: torch.device, dtype: torch.dtype) -> dict[str, LatentCache]:
        """Empty generation caches, one per decoder layer (by its global index)."""
        c = self.cfg
        return {name: LatentCache.empty(batch, max_len, c.kv_lora_rank, c.qk_rope_head_dim, device, dtype)
                for name in self.layers}

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache: dict[str, LatentCache]) -> torch.Tensor:
        """Generation forward: tokens [b, s] at positions [b, s] (each sequence its own), attending to
        `cache` and extending it -> logits [b, s, vocab] (this rank's vocabulary shard under TP).
        The same function of the tokens as `hidden_states` + `logits` on the whole sequence."""
        cos, sin = self.rope(next(iter(cache.values())).latent.shape[1], tokens.device)
        cos, sin = cos[positions], sin[positions]                                  # [b, s, rope/2]
        h = self.embed_tokens(tokens)
        for name, layer in self.layers.items():
            h = layer(h, cos, sin, cache[name], positions)
        return self.logits(h)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor, mtp_weight: float = 0.0) -> ModelOutput:
        """tokens, targets [b, s] (targets[i] = tokens[i+1] of the packed stream)."""
        return self.head_losses(self.hidden_states(tokens), tokens, targets, mtp_weight)

    def head_losses(self, hidden: torch.Tensor, tokens: torch.Tensor, targets: torch.Tensor,
                    mtp_weight: float) -> ModelOutput:
        """The LM and MTP losses from the last decoder layer's hidden states [b, s, d] (the model's
        end, also a pipeline's last stage)."""
        lm_loss = self.head_token_losses(self.norm(hidden), targets).mean()
        mtp_loss = self.mtp_loss(hidden, tokens, targets)
        return ModelOutput(loss=lm_loss + mtp_weight * mtp_loss, lm_loss=lm_loss, mtp_loss=mtp_loss)

    def mtp_loss(self, hidden: torch.Tensor, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean over depths k of -1/(b s) sum_i log P^k_i[t_{i+k+1}] (DeepSeek-V3 eq. 24).

        Depth k sees tokens and targets shifted left by k; the last k positions, whose shifted
        values would wrap around, are masked out of the loss (causal attention keeps them from
        influencing earlier positions).
        """
        if not self.mtp:
            return torch.zeros((), device=tokens.device)
        b, s = tokens.shape
        cos, sin = self.rope(s, tokens.device)
        losses = []
        for k, layer in enumerate(self.mtp.values(), start=1):
            tokens, targets = tokens.roll(-1, dims=1), targets.roll(-1, dims=1)
            hidden = layer(hidden, self.embed_tokens(tokens), cos, sin)
            per_token = self.head_token_losses(layer.norm(hidden), targets).view(b, s)
            losses.append(per_token[:, : s - k].sum() / (b * s))
        return torch.stack(losses).mean()


# ----------------------------------------------------------------------------- parameter counts

def _attention_params(cfg: ModelConfig) -> int:
    h, d = cfg.num_heads, cfg.hidden_size
    if cfg.q_lora_rank > 0:
        q = d * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * h * cfg.qk_head_dim
    else:
        q = d * h * cfg.qk_head_dim
    kv = d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank \
        + cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    return q + kv + h * cfg.v_head_dim * d + 2 * d     # + input and post-attention norms


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """Analytic counts without building the model: total and activated per token, each with and
    without the MTP depths (DeepSeek-V3's 671B / 37B exclude MTP)."""
    d = cfg.hidden_size
    attn = _attention_params(cfg)
    dense_layer = attn + 3 * d * cfg.intermediate_size
    expert = 3 * d * cfg.moe_intermediate_size
    moe_common = attn + cfg.n_routed_experts * d + cfg.n_shared_experts * expert
    moe_total = moe_common + cfg.n_routed_experts * expert
    moe_active = moe_common + cfg.num_experts_per_tok * expert
    outer = 2 * cfg.vocab_size * d + d                 # embedding, head, final norm
    dense = cfg.first_k_dense * dense_layer
    total = outer + dense + cfg.n_moe_layers * moe_total
    active = outer + dense + cfg.n_moe_layers * moe_active
    mtp_extra = 3 * d + 2 * d * d                      # enorm, hnorm, head norm, eh_proj
    mtp_total = cfg.mtp_depth * (mtp_extra + moe_total)
    mtp_active = cfg.mtp_depth * (mtp_extra + moe_active)
    return {"total": total, "active": active, "total_with_mtp": total + mtp_total,
            "active_with_mtp": active + mtp_active, "embedding": cfg.vocab_size * d}
