"""DeepSeek-V3-style FP8 training: blockwise E4M3 quantisation and FP8 linear / expert GEMMs.

`apply_fp8(model, cfg.fp8)` switches a model's Linear and GroupedExperts GEMMs to FP8.
Backends: `emulated` (any device; quantise, dequantise, fp32 GEMM) and `torch` (Hopper:
torch._scaled_mm with blockwise scales, Triton kernels for quantisation and experts).
"""
from megads.fp8.apply import DEFAULT_EXCLUDE, apply_fp8, build_recipe
from megads.fp8.grouped import FP8GroupedGemm, fp8_grouped_weight_grad
from megads.fp8.linear import FP8Gemm, FP8Recipe, fp8_weight_grad
from megads.fp8.quant import QTensor, dequantize, quantize_blocks, quantize_tiles

__all__ = [
    "DEFAULT_EXCLUDE",
    "FP8Gemm",
    "FP8GroupedGemm",
    "FP8Recipe",
    "QTensor",
    "apply_fp8",
    "build_recipe",
    "dequantize",
    "fp8_grouped_weight_grad",
    "fp8_weight_grad",
    "quantize_blocks",
    "quantize_tiles",
]
