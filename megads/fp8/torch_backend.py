"""The `torch` backend (Hopper): real FP8 GEMMs.

Dense GEMMs go to `torch._scaled_mm` with DeepSeek-style blockwise scales (the layout
measured in shared/FACTS.md): A [M, K] e4m3 row-major with 1x128 scales [M, K/128] stored
column-major; B [N, K] e4m3 row-major, passed transposed, with scales of 128x128 blocks
[N/128, K/128] or of 1x128 tiles [N, K/128], row-major, passed transposed. Every operand is
quantised along the GEMM's reduction dimension, so Dgrad uses the blocks of W^T and Wgrad
re-quantises grad and x along the tokens. Expert GEMMs use the grouped Triton kernels.
Quantisation is the Triton kernels' (bit-identical to megads.fp8.quant). Same method
contract as EmulatedBackend.
"""
from __future__ import annotations

import torch

from megads.fp8 import triton_kernels as tk
from megads.fp8.quant import QTensor, crop


def scaled_mm(a: QTensor, b: QTensor, out_dtype: torch.dtype) -> torch.Tensor:
    """a: 1x128 tiles [Mp, Kp] (column-major scales); b: [Np, Kp] in 128x128 blocks or 1x128 tiles
    (row-major scales) -> a b^T [Mp, Np] with fp32 accumulation."""
    return torch._scaled_mm(a.data, b.data.t(), scale_a=a.scale, scale_b=b.scale.t(), out_dtype=out_dtype)


class TorchBackend:
    name = "torch"

    def __init__(self, power_of_two: bool = False):
        self.power_of_two = power_of_two

    # ------------------------------------------------------------------ dense

    def fprop(self, x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        a = tk.quantize_rows(x, self.power_of_two)                          # [Mp, Kp]
        b = tk.quantize_blocks(weight, self.power_of_two)                   # [Np, Kp]
        return crop(scaled_mm(a, b, out_dtype), x.shape[0], weight.shape[0])

    def dgrad(self, grad_out: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        a = tk.quantize_rows(grad_out, self.power_of_two)                   # [Mp, Np]
        b = tk.quantize_blocks(weight, self.power_of_two, transpose=True)   # W^T blocks [Kp, Np]
        return crop(scaled_mm(a, b, out_dtype), grad_out.shape[0], weight.shape[1])

    def wgrad_input(self, x: torch.Tensor) -> QTensor:
        return tk.quantize_cols(x, self.power_of_two, scale_col_major=False)   # x^T [Kp, Mp], B operand

    def wgrad(self, grad_out: torch.Tensor, x_t: QTensor, k: int) -> torch.Tensor:
        a = tk.quantize_cols(grad_out, self.power_of_two)                   # grad^T [Np, Mp], A operand
        return crop(scaled_mm(a, x_t, torch.float32), grad_out.shape[1], k)

    # ------------------------------------------------------------------ grouped (experts)

    def group_layout(self, counts: torch.Tensor, n: int) -> tk.GroupLayout:
        return tk.group_layout(counts, n)

    def grouped_fprop(self, x: torch.Tensor, weight: torch.Tensor, layout: tk.GroupLayout,
                      out_dtype: torch.dtype) -> torch.Tensor:
        a = self._rows(x, layout)
        b = tk.quantize_blocks(weight, self.power_of_two)                   # [E, Np, Kp]
        return tk.grouped_mm(a, b, layout, weight.shape[1], x.shape[0], out_dtype)

    def grouped_dgrad(self, grad_out: torch.Tensor, weight: torch.Tensor, layout: tk.GroupLayout,
                      out_dtype: torch.dtype) -> torch.Tensor:
        a = self._rows(grad_out, layout)
        b = tk.quantize_blocks(weight, self.power_of_two, transpose=True)   # [E, Kp, Np]
        return tk.grouped_mm(a, b, layout, weight.shape[2], grad_out.shape[0], out_dtype)

    def grouped_wgrad_input(self, x: torch.Tensor, layout: tk.GroupLayout) -> QTensor:
        return self._cols(x, layout)

    def grouped_wgrad(self, grad_out: torch.Tensor, x_t: QTensor, layout: tk.GroupLayout, k: int) -> torch.Tensor:
        return tk.grouped_wgrad(self._cols(grad_out, layout), x_t, layout, grad_out.shape[1], k)

    def _rows(self, x: torch.Tensor, layout: tk.GroupLayout) -> QTensor:
        return tk.quantize_rows(x, self.power_of_two, rows=layout.row_src.numel(), src=layout.row_src)

    def _cols(self, x: torch.Tensor, layout: tk.GroupLayout) -> QTensor:
        return tk.quantize_cols(x, self.power_of_two, rows=layout.row_src.numel(), src=layout.row_src)
