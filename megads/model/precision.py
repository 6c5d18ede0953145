"""Megatron's precision layout for bf16 training with fp32 master weights (`train.precision=main_grads`).

    weights    the parameters stay fp32: they are what the optimizer updates and checkpoints hold.
               Every GEMM weight has a bf16 copy, made once per optimizer step (`refresh()` after the
               update), which all micro-batches of the step multiply by
    gradients  fp32 in `.grad`. The weight-gradient GEMM writes fp32 directly: the first micro-batch's
               result becomes `.grad`; later micro-batches add into it inside the GEMM (`addmm` with
               bf16 operands and an fp32 output, Megatron's gradient-accumulation fusion; the routed
               experts' grouped GEMM writes bf16, its only output dtype, added into the fp32 .grad
               in place)

`torch.autocast` (`train.precision=autocast`) instead casts each fp32 weight at every use, once per
micro-batch, and its bf16 weight gradients are cast and added into `.grad` afterwards: three passes
over every gradient per micro-batch where this layout has one. Only the GEMMs' weights change
hands; embeddings, norms and the router keep their fp32 parameters under autocast.

A gradient added in place never reaches autograd's gradient hooks. Weights whose gradients are
reduced by hooks (DeepSpeed ZeRO, the sum over TP of a replicated weight under sequence
parallelism) get `accumulate=False`: their GEMMs return each micro-batch's fp32 gradient to autograd.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from megads.model.layers import Linear, LinearFunction
from megads.model.moe import GroupedExperts, GroupedLinearFunction, grouped_mm_supported


class WeightCopies:
    """The compute-dtype copy of each GEMM weight, refreshed in place after every change of the
    weights (the optimizer step, a checkpoint load): `refresh()`."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.copies: dict[nn.Parameter, torch.Tensor] = {}

    def add(self, weight: nn.Parameter) -> None:
        if weight not in self.copies:
            self.copies[weight] = weight.detach().to(self.dtype)

    def of(self, weight: nn.Parameter) -> torch.Tensor:
        return self.copies[weight]

    @torch.no_grad()
    def refresh(self) -> None:
        if self.copies:
            torch._foreach_copy_(list(self.copies.values()), list(self.copies.keys()))

    def __len__(self) -> int:
        return len(self.copies)


class MainGradGemm:
    """A `LinearStrategy.gemm`: x times the weight's bf16 copy; the fp32 weight gradient added into
    `.grad` by the GEMM (`accumulate`), or returned to autograd."""
    kind = ""

    def __init__(self, copies: WeightCopies, accumulate: bool):
        self.copies, self.accumulate = copies, accumulate

    def __repr__(self) -> str:
        return f"{self.kind}bf16-copy, main-grad " + ("accumulated" if self.accumulate else "returned")

    def main_grad(self, weight: nn.Parameter) -> torch.Tensor | None:
        """The .grad the GEMM adds into (None: the first micro-batch's, or one a hook must see)."""
        return weight.grad if self.accumulate else None

    def __call__(self, x: torch.Tensor, weight: nn.Parameter) -> torch.Tensor:
        copy = self.copies.of(weight)
        with torch.autocast(x.device.type, enabled=False):
            return LinearFunction.apply(x.to(copy.dtype), weight, copy, self.main_grad(weight))


class MainGradGroupedGemm(MainGradGemm):
    """An `ExpertsStrategy.gemm`: the routed experts' grouped GEMM on the weights' bf16 copies, the
    fp32 weight gradients added into `.grad` (`accumulate`) or returned to autograd."""
    kind = "grouped "

    def __call__(self, x: torch.Tensor, weight: nn.Parameter, counts: torch.Tensor) -> torch.Tensor:
        copy = self.copies.of(weight)
        x = x.to(copy.dtype).contiguous()
        with torch.autocast(x.device.type, enabled=False):
            return GroupedLinearFunction.apply(x, weight, copy, counts, grouped_mm_supported(x, copy),
                                               self.main_grad(weight))


def main_grad_strategies(model: nn.Module, copies: WeightCopies, strategies: dict[str, object],
                         keep: set[str], accumulates: bool, returns: set[str]) -> dict[str, object]:
    """Module name -> its strategy with the main-grad GEMM, for every `Linear` and `GroupedExperts`
    except the modules in `keep` (FP8 ones, whose GEMMs already read cached weight blocks and write
    fp32 gradients). Their weights get copies in `copies`. `accumulates`: gradients may be added in
    place (no gradient hook reduces them); `returns`: modules whose weight gradients must reach
    autograd even so."""
    out: dict[str, object] = {}
    for name, module in model.named_modules():
        if name in keep or not isinstance(module, (Linear, GroupedExperts)):
            continue
        accumulate = accumulates and name not in returns
        gemm_type = MainGradGemm if isinstance(module, Linear) else MainGradGroupedGemm
        for weight in module.parameters(recurse=False):
            copies.add(weight)
        out[name] = replace(strategies.get(name, module.strategy), gemm=gemm_type(copies, accumulate))
    return out
