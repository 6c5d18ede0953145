"""Rotary position embedding with YaRN frequency scaling (DeepSeek-V3 / arXiv 2309.00071).

Pairs are interleaved, (x0, x1), (x2, x3), ..., as in the released DeepSeek-V3 weights.
"""
from __future__ import annotations

import math

import torch

from megads.config import ModelConfig


def yarn_mscale(factor: float, mscale: float) -> float:
    """0.1 * mscale * ln(factor) + 1 (YaRN paper, eq. 21); 1 without scaling."""
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


def attention_factor(cfg: ModelConfig) -> float:
    """YaRN's factor on cos/sin (so on the rope part of q.k): DeepSeek's mscale(mscale) /
    mscale(mscale_all_dim), times `rope_attention_factor`, which carries the factor transformers
    applies where rope_scaling does not give that ratio (see checkpoint/hf.py). The ratio is taken
    first so that equal mscales give exactly `rope_attention_factor`."""
    ratio = yarn_mscale(cfg.rope_factor, cfg.mscale) / yarn_mscale(cfg.rope_factor, cfg.mscale_all_dim)
    return cfg.rope_attention_factor * ratio


def softmax_scale(cfg: ModelConfig) -> float:
    """qk_head_dim^-0.5, times mscale^2 when YaRN is on."""
    return cfg.qk_head_dim ** -0.5 * yarn_mscale(cfg.rope_factor, cfg.mscale_all_dim) ** 2


def _correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    """Pair index whose wavelength completes `num_rotations` turns over `max_pos` positions."""
    return dim * math.log(max_pos / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def inverse_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """[rope_dim/2] fp32 inverse frequencies; YaRN blends freq/factor into freq by a linear ramp."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if cfg.rope_factor > 1:
        orig = cfg.original_max_position_embeddings
        low = max(math.floor(_correction_dim(cfg.beta_fast, dim, base, orig)), 0)
        high = min(math.ceil(_correction_dim(cfg.beta_slow, dim, base, orig)), dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        keep = 1 - ramp                     # 1: high-frequency pairs keep their frequency
        freqs = freqs / cfg.rope_factor * (1 - keep) + freqs * keep
    return freqs


def rope_cos_sin(cfg: ModelConfig, seq_len: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [seq_len, rope_dim/2] (fp32), with YaRN's attention factor folded in."""
    freqs = inverse_frequencies(cfg).to(device)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), freqs)
    scale = attention_factor(cfg)
    return angles.cos() * scale, angles.sin() * scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs. x [b, s, h, rope_dim]; cos/sin [s, rope_dim/2], or [b, s, rope_dim/2]
    when every sequence has its own positions (cached generation)."""
    pairs = x.float().unflatten(-1, (-1, 2))            # [b, s, h, rope_dim/2, 2]
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)      # broadcast over heads
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)
