"""The `emulated` backend: quantise with the FP8 tiling, dequantise to fp32, multiply in fp32.

Runs on any device. Its results are what an FP8 GEMM with fp32 accumulation computes (up to
summation order), so it checks numerics on CPU and is the reference for the `torch` backend.

Backend contract (shared with TorchBackend; GEMMs are A [M, K] x B [N, K]^T, both operands
quantised along K, results padded to multiples of 128 and cropped by the caller):
  quantize_act(x, rows, cols, layout)   activations / gradients, one pass
  quantize_weight(w, forward, transposed)
  mm(a, b, out_dtype)                   dense
  group_layout(counts, n), grouped_mm(...), grouped_wgrad(...)   experts
"""
from __future__ import annotations

import torch

from megads.fp8.quant import QTensor, crop, dequantize, quantize_blocks, quantize_tiles, round_up, transpose_blocks


class EmulatedBackend:
    name = "emulated"

    def __init__(self, power_of_two: bool = False):
        self.power_of_two = power_of_two

    def quantize_act(self, x: torch.Tensor, rows: bool, cols: bool, layout: list[int] | None = None
                     ) -> tuple[QTensor | None, QTensor | None]:
        """x [R, C] -> (1x128 tiles along C [Rp, Cp] if rows, x^T in 1x128 tiles along R [Cp, Rp] if cols).
        With an expert layout, the tiles along R restart at each expert's first row: the experts'
        segments are quantised separately, padded to multiples of 128 and concatenated."""
        by_rows = quantize_tiles(x, self.power_of_two) if rows else None
        by_cols = None
        if cols and layout is None:
            by_cols = quantize_tiles(x.t(), self.power_of_two)
        elif cols:
            parts = [quantize_tiles(chunk.t(), self.power_of_two) for chunk in x.split(layout)]
            by_cols = QTensor(torch.cat([p.data for p in parts], -1), torch.cat([p.scale for p in parts], -1))
        return by_rows, by_cols

    def quantize_weight(self, w: torch.Tensor, forward: bool, transposed: bool) -> tuple[QTensor | None, QTensor | None]:
        """w [.., N, K] -> (128x128 blocks of w, blocks of w^T), each when asked for."""
        q = quantize_blocks(w, self.power_of_two)
        return (q if forward else None), (transpose_blocks(q) if transposed else None)

    def mm(self, a: QTensor, b: QTensor, out_dtype: torch.dtype) -> torch.Tensor:
        """a [Mp, Kp], b [Np, Kp] -> a b^T [Mp, Np]."""
        return (dequantize(a) @ dequantize(b).t()).to(out_dtype)

    def group_layout(self, counts: torch.Tensor, n: int) -> list[int]:
        """Rows per expert, as Python ints."""
        return counts.tolist()

    def grouped_mm(self, a: QTensor, b: QTensor, layout: list[int], rows: int, cols: int,
                   out_dtype: torch.dtype) -> torch.Tensor:
        """a: rows of all experts in 1x128 tiles [>= rows, Kp]; b: per-expert blocks [E, Np, Kp]
        -> [rows, cols], each expert's rows times its own b^T."""
        x, w = dequantize(a), dequantize(b)
        outs, start = [], 0
        for e, count in enumerate(layout):
            outs.append(x[start:start + count] @ w[e].t())
            start += count
        return crop(torch.cat(outs), rows, cols).to(out_dtype)

    def grouped_wgrad(self, a: QTensor, b: QTensor, layout: list[int], n: int, k: int) -> torch.Tensor:
        """a = grad^T, b = x^T, both quantize_act(.., cols=True, layout) -> [E, n, k] fp32."""
        g, x = dequantize(a), dequantize(b)
        out = g.new_zeros(len(layout), n, k)
        start = 0
        for e, count in enumerate(layout):
            width = round_up(count)
            out[e] = crop(g[:, start:start + width] @ x[:, start:start + width].t(), n, k)
            start += width
        return out
