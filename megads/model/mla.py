"""Multi-head latent attention (DeepSeek-V2/V3).

Queries optionally pass through a low-rank latent (q_lora_rank); keys and values share one
compressed latent c_kv [kv_lora_rank] plus a single decoupled RoPE key shared by all heads.
Head counts are read from tensor shapes (`-1` in views), so the same code runs on a
tensor-parallel shard holding a slice of the heads. The strategy's `to_heads` marks where
per-token latents (computed on this rank's tokens) become the input of per-head projections:
identity on one process; under tensor parallelism it copies (or, with sequence parallelism,
all-gathers) them.
"""
from __future__ import annotations

from dataclasses import dataclass
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from megads.config import ModelConfig
from megads.model.layers import Linear, Region, RMSNorm, identity
from megads.model.rope import apply_rope, softmax_scale

# SDPA backends in order of preference. The flash backend refuses MLA's unequal q/k and v head
# dims (192 / 128), and PyTorch's default order then falls to the memory-efficient kernel, ~9x
# slower than cuDNN's on Hopper for fwd+bwd (benchmarks/RESULTS.md); CPU uses flash or math as before.
SDPA_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                 SDPBackend.MATH]


@dataclass(frozen=True)
class AttentionStrategy:
    to_heads: Region = identity        # per-token latents [b, s(/tp), c] -> the heads' input [b, s, c]


@dataclass
class LatentCache:
    """One MLA layer's generation cache: only what MLA needs to rebuild keys and values, the
    normalised kv latent and the rotated rope key of every position written so far."""

    latent: torch.Tensor        # [b, max_len, kv_lora_rank]
    k_rope: torch.Tensor        # [b, max_len, rope_dim]

    @classmethod
    def empty(cls, batch: int, max_len: int, kv_lora_rank: int, rope_dim: int, device: torch.device,
              dtype: torch.dtype) -> "LatentCache":
        return cls(torch.zeros(batch, max_len, kv_lora_rank, device=device, dtype=dtype),
                   torch.zeros(batch, max_len, rope_dim, device=device, dtype=dtype))

    def write(self, positions: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor) -> None:
        """Store new entries; positions [b, s], latent [b, s, c], k_rope [b, s, rope]."""
        rows = torch.arange(positions.shape[0], device=positions.device)[:, None]
        self.latent[rows, positions] = latent.to(self.latent.dtype)
        self.k_rope[rows, positions] = k_rope.to(self.k_rope.dtype)


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, d = cfg.num_heads, cfg.hidden_size
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        if cfg.q_lora_rank > 0:
            self.q_a_proj = Linear(d, cfg.q_lora_rank)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = Linear(cfg.q_lora_rank, h * cfg.qk_head_dim)
        else:
            self.q_proj = Linear(d, h * cfg.qk_head_dim)
        self.kv_a_proj_with_mqa = Linear(d, cfg.kv_lora_rank + self.rope_dim)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, h * (self.nope_dim + self.v_dim))
        self.o_proj = Linear(h * self.v_dim, d)
        self.scale = softmax_scale(cfg)
        self.strategy = AttentionStrategy()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LatentCache | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """Causal self-attention over x. With `cache` (generation): x holds new tokens at `positions`
        [b, s] (cos/sin [b, s, rope/2] gathered at them); their latents are written to the cache
        and each query attends to the cached positions up to its own."""
        b = x.shape[0]                                                      # x [b, s, d] (s/tp under SP)
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.strategy.to_heads(self.q_a_layernorm(self.q_a_proj(x))))
        s = q.shape[1]                                                      # the full sequence
        q = q.view(b, s, -1, self.nope_dim + self.rope_dim)                 # [b, s, h, nope+rope]
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_rope = apply_rope(q_rope, cos, sin)

        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent, k_rope = self.strategy.to_heads(torch.cat([self.kv_a_layernorm(latent), k_rope], dim=-1)) \
            .split([self.kv_lora_rank, self.rope_dim], dim=-1)
        k_rope = apply_rope(k_rope.unsqueeze(2), cos, sin)                  # [b, s, 1, rope], shared by heads
        mask = None
        if cache is not None:
            cache.write(positions, latent, k_rope.squeeze(2))
            keys = int(positions.max()) + 1                                 # kv length t
            latent, k_rope = cache.latent[:, :keys], cache.k_rope[:, :keys, None]
            mask = (torch.arange(keys, device=x.device) <= positions[..., None]).unsqueeze(1)   # [b, 1, s, t]
        t = latent.shape[1]
        kv = self.kv_b_proj(latent).view(b, t, -1, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)           # [b, t, h, nope], [b, t, h, v]
        heads = k_nope.shape[2]

        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(-1, -1, heads, -1)], dim=-1)
        with sdpa_kernel(SDPA_BACKENDS, set_priority=True):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=mask, is_causal=mask is None, scale=self.scale)   # [b, h, s, v]
        return self.o_proj(out.transpose(1, 2).reshape(b, s, heads * self.v_dim))
