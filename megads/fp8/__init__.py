"""DeepSeek-V3-style FP8 training: blockwise E4M3 quantisation and FP8 linear / expert GEMMs.

`fp8_strategies` gives a model's Linear and GroupedExperts layers FP8 GEMMs (the model builder
hands them over).
Backends: `emulated` (any device; quantise, dequantise, fp32 GEMM) and `torch` (Hopper:
torch._scaled_mm with blockwise scales, Triton kernels for quantisation and experts).
"""
from megads.fp8.apply import DEFAULT_EXCLUDE, build_recipe, fp8_send_rows, fp8_strategies
from megads.fp8.grouped import FP8GroupedGemm, fp8_grouped_weight_grad
from megads.fp8.linear import FP8Gemm, FP8Recipe, fp8_weight_grad
from megads.fp8.quant import QTensor, dequantize, quantize_blocks, quantize_tiles

__all__ = [
    "DEFAULT_EXCLUDE",
    "FP8Gemm",
    "FP8GroupedGemm",
    "FP8Recipe",
    "QTensor",
    "build_recipe",
    "dequantize",
    "fp8_grouped_weight_grad",
    "fp8_send_rows",
    "fp8_strategies",
    "fp8_weight_grad",
    "quantize_blocks",
    "quantize_tiles",
]
