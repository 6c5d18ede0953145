"""Blockwise E4M3 quantisation, DeepSeek-V3's recipe (report, 3.3.2), in plain PyTorch.

Activations and activation gradients get one scale per 1x128 tile along the reduction
dimension; weights one scale per 128x128 block. For each tile or block

    scale = max(amax, EPS) * (1/448)   (optionally rounded up to a power of two)
    q     = e4m3(x / scale)               (round to nearest even, clamped to +-448)
    x    ~= q * scale

Sizes that are not multiples of 128 are zero-padded to the next multiple first. A partial
tile's scale then comes from its real elements alone, and the padding is exact zeros in
every product, so padded GEMMs compute the unpadded ones. These functions are the numerics
reference: the emulated backend uses them, and the Triton kernels reproduce them bit for bit.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
TILE = 128
EPS = 1e-12     # amax floor: keeps all-zero tiles finite without flattening tiny gradients


class QTensor(NamedTuple):
    """A quantised matrix (or a stack of them), sizes padded to multiples of 128.

    data  [..., Rp, Cp] float8_e4m3fn
    scale [..., Rp, Cp/128] fp32 for 1x128 tiles along C, [..., Rp/128, Cp/128] for 128x128 blocks
    """

    data: torch.Tensor
    scale: torch.Tensor


def round_up(n: int, multiple: int = TILE) -> int:
    return -(-n // multiple) * multiple


def pad_last2(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Zero-pad the last two dims of x to [rows, cols] (x itself when already that size)."""
    r, c = x.shape[-2:]
    return x if (r, c) == (rows, cols) else F.pad(x, (0, cols - c, 0, rows - r))


def crop(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The top-left [rows, cols] of a padded GEMM result, contiguous."""
    return x if x.shape == (rows, cols) else x[:rows, :cols].contiguous()


def pow2_ceil(scale: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= scale, for positive normal fp32, by bit arithmetic (exact)."""
    return ((scale.view(torch.int32) + 0x7FFFFF) & 0x7F800000).view(torch.float32)


def scales_from_amax(amax: torch.Tensor, power_of_two: bool = False) -> torch.Tensor:
    # a product with the fp32 constant 1/448, not a division: GPUs divide by a scalar that way
    # anyway, and the Triton kernels then reproduce the scales exactly
    scale = amax.float().clamp(min=EPS) * (1.0 / E4M3_MAX)
    return pow2_ceil(scale) if power_of_two else scale


def _to_e4m3(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def quantize_tiles(x: torch.Tensor, power_of_two: bool = False) -> QTensor:
    """1x128 tiles along the last dim. x [..., R, C] -> data [..., Rp, Cp], scale [..., Rp, Cp/128]."""
    x = pad_last2(x.float(), round_up(x.shape[-2]), round_up(x.shape[-1]))
    tiles = x.unflatten(-1, (-1, TILE))                                  # [..., Rp, Cp/128, 128]
    scale = scales_from_amax(tiles.abs().amax(-1), power_of_two)          # [..., Rp, Cp/128]
    return QTensor(_to_e4m3(tiles / scale.unsqueeze(-1)).flatten(-2), scale)


def quantize_blocks(w: torch.Tensor, power_of_two: bool = False) -> QTensor:
    """128x128 blocks. w [..., R, C] -> data [..., Rp, Cp], scale [..., Rp/128, Cp/128]."""
    w = pad_last2(w.float(), round_up(w.shape[-2]), round_up(w.shape[-1]))
    blocks = w.unflatten(-1, (-1, TILE)).unflatten(-3, (-1, TILE))       # [..., Rb, 128, Cb, 128]
    scale = scales_from_amax(blocks.abs().amax(dim=(-3, -1)), power_of_two)   # [..., Rb, Cb]
    data = _to_e4m3(blocks / scale[..., :, None, :, None])
    return QTensor(data.flatten(-2).flatten(-3, -2), scale)


def dequantize(q: QTensor) -> torch.Tensor:
    """fp32 [..., Rp, Cp]: q.data * its tile's or block's scale."""
    x = q.data.float().unflatten(-1, (-1, TILE))                         # [..., Rp, Cp/128, 128]
    if q.scale.shape[-2] == q.data.shape[-2]:                            # 1x128 tiles
        return (x * q.scale.unsqueeze(-1)).flatten(-2)
    x = x.unflatten(-3, (-1, TILE))                                      # [..., Rb, 128, Cb, 128]
    return (x * q.scale[..., :, None, :, None]).flatten(-2).flatten(-3, -2)


def transpose_blocks(q: QTensor) -> QTensor:
    """The 128x128-block quantisation of W^T from that of W: the same blocks, transposed."""
    return QTensor(q.data.transpose(-1, -2).contiguous(), q.scale.transpose(-1, -2).contiguous())
