"""The `emulated` backend: quantise with the FP8 tiling, dequantise to fp32, multiply in fp32.

Runs on any device. Its results are what an FP8 GEMM with fp32 accumulation computes (up to
summation order), so it checks numerics on CPU and is the reference for the `torch` backend.
All methods take and return unpadded tensors; GEMMs are [M, K] x [N, K]^T -> [M, N].
"""
from __future__ import annotations

import torch

from megads.fp8.quant import QTensor, crop, dequantize, quantize_blocks, quantize_tiles, round_up


class EmulatedBackend:
    name = "emulated"

    def __init__(self, power_of_two: bool = False):
        self.power_of_two = power_of_two

    # ------------------------------------------------------------------ dense

    def fprop(self, x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """x [M, K], weight [N, K] -> x W^T [M, N]; x in 1x128 tiles along K, W in 128x128 blocks."""
        m, n = x.shape[0], weight.shape[0]
        out = dequantize(quantize_tiles(x, self.power_of_two)) @ self._weight(weight).t()
        return crop(out, m, n).to(out_dtype)

    def dgrad(self, grad_out: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """grad_out [M, N], weight [N, K] -> grad_out W [M, K]; grad_out in 1x128 tiles along N."""
        m, k = grad_out.shape[0], weight.shape[1]
        out = dequantize(quantize_tiles(grad_out, self.power_of_two)) @ self._weight(weight)
        return crop(out, m, k).to(out_dtype)

    def wgrad_input(self, x: torch.Tensor) -> QTensor:
        """x [M, K] -> x^T in 1x128 tiles along the tokens M: data [Kp, Mp]."""
        return quantize_tiles(x.t(), self.power_of_two)

    def wgrad(self, grad_out: torch.Tensor, x_t: QTensor, k: int) -> torch.Tensor:
        """grad_out [M, N], x_t = wgrad_input(x) -> grad_out^T x [N, K] fp32; both along tokens."""
        n = grad_out.shape[1]
        g_t = dequantize(quantize_tiles(grad_out.t(), self.power_of_two))   # [Np, Mp]
        return crop(g_t @ dequantize(x_t).t(), n, k)

    def _weight(self, weight: torch.Tensor) -> torch.Tensor:
        return dequantize(quantize_blocks(weight, self.power_of_two))      # [Np, Kp]

    # ------------------------------------------------------------------ grouped (experts)

    def group_layout(self, counts: torch.Tensor, n: int) -> list[int]:
        """Rows per expert, as Python ints."""
        return counts.tolist()

    def grouped_fprop(self, x: torch.Tensor, weight: torch.Tensor, layout: list[int],
                      out_dtype: torch.dtype) -> torch.Tensor:
        """x [n, K] sorted by expert, weight [E, N, K] -> [n, N]: x_e W_e^T per expert."""
        return self._grouped(x, weight, layout, out_dtype, transpose_weight=True)

    def grouped_dgrad(self, grad_out: torch.Tensor, weight: torch.Tensor, layout: list[int],
                      out_dtype: torch.dtype) -> torch.Tensor:
        """grad_out [n, N], weight [E, N, K] -> [n, K]: grad_e W_e per expert."""
        return self._grouped(grad_out, weight, layout, out_dtype, transpose_weight=False)

    def grouped_wgrad_input(self, x: torch.Tensor, layout: list[int]) -> QTensor:
        """x [n, K] -> each expert's x_e^T in 1x128 tiles along its own tokens, the experts'
        segments padded to multiples of 128 and concatenated: data [Kp, sum_e round_up(n_e)]."""
        parts = [quantize_tiles(chunk.t(), self.power_of_two) for chunk in x.split(layout)]
        return QTensor(torch.cat([p.data for p in parts], -1), torch.cat([p.scale for p in parts], -1))

    def grouped_wgrad(self, grad_out: torch.Tensor, x_t: QTensor, layout: list[int], k: int) -> torch.Tensor:
        """grad_out [n, N], x_t = grouped_wgrad_input(x) -> [E, N, K] fp32 per-expert grad_e^T x_e."""
        n = grad_out.shape[1]
        x_all = dequantize(x_t)                                           # [Kp, sum padded]
        out = grad_out.new_zeros(len(layout), n, k, dtype=torch.float32)
        start = 0
        for e, chunk in enumerate(grad_out.split(layout)):
            width = round_up(chunk.shape[0])
            if width:
                g_t = dequantize(quantize_tiles(chunk.t(), self.power_of_two))   # [Np, width]
                out[e] = crop(g_t @ x_all[:, start:start + width].t(), n, k)
            start += width
        return out

    def _grouped(self, x: torch.Tensor, weight: torch.Tensor, layout: list[int], out_dtype: torch.dtype,
                 transpose_weight: bool) -> torch.Tensor:
        rows = dequantize(quantize_tiles(x, self.power_of_two))           # [np, Kp]: tiles never span rows
        weights = dequantize(quantize_blocks(weight, self.power_of_two))  # [E, Np, Kp]
        width = weight.shape[1] if transpose_weight else weight.shape[2]
        outs, start = [], 0
        for e, count in enumerate(layout):
            w = weights[e].t() if transpose_weight else weights[e]
            outs.append(rows[start:start + count] @ w)
            start += count
        out = torch.cat(outs)
        return crop(out, out.shape[0], width).to(out_dtype)
