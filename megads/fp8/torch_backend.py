"""The `torch` backend (Hopper): real FP8 GEMMs, with the contract of EmulatedBackend.

Dense GEMMs go to `torch._scaled_mm` with DeepSeek-style blockwise scales. The layouts it
accepts (checked against the dequantised reference by benchmarks/fp8_gemm.py, see
benchmarks/RESULTS.md): A [M, K] e4m3 row-major with 1x128 scales [M, K/128] stored
column-major; B [N, K] e4m3 row-major, passed transposed, with either 128x128 block scales
[N/128, K/128] stored row-major or 1x128 scales [N, K/128] stored column-major, each passed
transposed. Quantisation and the expert GEMMs are Triton kernels (megads.fp8.triton_kernels).
"""
from __future__ import annotations

import functools

import torch

from megads.fp8 import triton_kernels as tk
from megads.fp8.quant import TILE, QTensor, transpose_blocks


# Dense operands are zero-padded to multiples of 512, not 128: cuBLASLt reads a 128x128-block
# scale matrix with rows of round_up(K/128, 4) floats, while torch._scaled_mm (2.11) accepts only
# rows of K/128 and passes the pointer on, so K/128 must be a multiple of 4 (else the product is
# silently wrong). The padding is exact zeros; the caller crops the result.
DENSE_MULTIPLE = 4 * TILE


def _scaled_mm(a: QTensor, b: QTensor, out_dtype: torch.dtype) -> torch.Tensor:
    return torch._scaled_mm(a.data, b.data.t(), scale_a=a.scale, scale_b=b.scale.t(), out_dtype=out_dtype)


@functools.cache
def fp32_output_supported(device: torch.device) -> bool:
    """Whether this build's blockwise _scaled_mm writes fp32 (cuBLASLt versions differ). Where it
    does not, the fp32 results (Wgrad) are written in bf16 and widened, as autocast's weight
    gradients are; benchmarks/fp8_gemm.py reports which one ran."""
    a = tk.quantize_act(torch.ones(128, 128, device=device), False, rows=True, cols=False)[0]
    try:
        _scaled_mm(a, a, torch.float32)
    except RuntimeError:
        return False
    return True


class TorchBackend:
    name = "torch"

    def __init__(self, power_of_two: bool = False):
        self.power_of_two = power_of_two

    def quantize_act(self, x: torch.Tensor, rows: bool, cols: bool, layout: tk.GroupLayout | None = None
                     ) -> tuple[QTensor | None, QTensor | None]:
        if layout is None:
            return tk.quantize_act(x, self.power_of_two, rows, cols, multiple=DENSE_MULTIPLE)
        return tk.quantize_act(x, self.power_of_two, rows, cols, capacity=layout.row_src.numel(), src=layout.row_src)

    def quantize_weight(self, w: torch.Tensor, forward: bool, transposed: bool) -> tuple[QTensor | None, QTensor | None]:
        """Blocks of w [.., N, K] and of w^T (the same blocks transposed: a copy, no re-quantisation)."""
        q = tk.quantize_weight(w, self.power_of_two, DENSE_MULTIPLE if w.dim() == 2 else TILE)
        return (q if forward else None), (transpose_blocks(q) if transposed else None)

    def mm(self, a: QTensor, b: QTensor, out_dtype: torch.dtype) -> torch.Tensor:
        """a [Mp, Kp] 1x128 tiles, b [Np, Kp] 128x128 blocks or 1x128 tiles -> a b^T [Mp, Np]."""
        if out_dtype == torch.float32 and not fp32_output_supported(a.data.device):
            return _scaled_mm(a, b, torch.bfloat16).float()
        return _scaled_mm(a, b, out_dtype)

    def group_layout(self, counts: torch.Tensor, n: int) -> tk.GroupLayout:
        return tk.group_layout(counts, n)

    def grouped_mm(self, a: QTensor, b: QTensor, layout: tk.GroupLayout, rows: int, cols: int,
                   out_dtype: torch.dtype) -> torch.Tensor:
        return tk.grouped_mm(a, b, layout, cols, rows, out_dtype)

    def grouped_wgrad(self, a: QTensor, b: QTensor, layout: tk.GroupLayout, n: int, k: int) -> torch.Tensor:
        return tk.grouped_wgrad(a, b, layout, n, k)
