"""FP8 for the expert-dispatch all-to-all (DeepSeek-V3 report, 3.3.3): the rows sent to the
experts' ranks travel as E4M3 bytes with one fp32 scale per 1x128 tile (1 + 4/128 bytes per
element instead of 2) and are dequantised to the input's dtype on arrival. The FP8 expert GEMMs
quantise their input with the same tiles, so the values they see are unchanged whenever the
arriving rows would be quantised anyway.

The gradient travels back in the input's dtype, and the quantisation counts as the identity in
backward (a straight-through estimate), as for every quantised operand of the FP8 GEMMs.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megads.fp8.quant import TILE, QTensor


def dequantize_rows(q: QTensor, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows in 1x128 tiles, data [n, Cp] e4m3 and scale [n, Cp/128] -> [n, cols] in `dtype`."""
    x = q.data.float().unflatten(-1, (-1, TILE)) * q.scale.unsqueeze(-1)    # [n, Cp/128, 128]
    return x.flatten(-2)[:, :cols].to(dtype)


def _exchange(t: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    out = t.new_empty((sum(output_splits),) + t.shape[1:])
    dist.all_to_all_single(out, t.contiguous(), output_splits, input_splits, group=group)
    return out


class _FP8AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, output_splits: list[int], input_splits: list[int], group,
                backend) -> torch.Tensor:
        ctx.splits, ctx.group = (output_splits, input_splits), group
        n, cols = x.shape
        q = backend.quantize_act(x, rows=True, cols=False)[0]                 # rows padded to 128: crop
        data = _exchange(q.data[:n].view(torch.uint8), output_splits, input_splits, group)
        scale = _exchange(q.scale[:n], output_splits, input_splits, group)
        return dequantize_rows(QTensor(data.view(q.data.dtype), scale), cols, x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        output_splits, input_splits = ctx.splits
        return _exchange(grad, input_splits, output_splits, ctx.group), None, None, None, None


def fp8_all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group, backend) -> torch.Tensor:
    """all_to_all_single of the rows of x [n, C] with uneven splits, sent in FP8 (1x128 tiles of
    `backend`, an FP8 backend); returns [sum(output_splits), C] in x's dtype."""
    return _FP8AllToAll.apply(x, output_splits, input_splits, group, backend)
