"""FP8 GEMMs for a model, as strategies the model builder hands its layers: `fp8_strategies`.

Every `Linear`'s strategy gets `gemm = FP8Gemm` and every `GroupedExperts`' gets `gemm =
FP8GroupedGemm`, except modules matching an exclude pattern. As in DeepSeek-V3 (report,
3.3.1) the output head stays in high precision, and so does the MTP projection `eh_proj`
(the released model keeps it in bf16); the embedding, router, norms and attention core are
not Linear modules and are never touched. With `fp8.dispatch` the expert-parallel dispatch
exchange sends E4M3 rows with their 1x128 scales (`fp8_send_rows`, megads.fp8.dispatch); the
combine stays in the activations' dtype, as in the report.

Sizes that are not multiples of 128 are zero-padded inside the FP8 GEMMs (exact), so any
model shape is accepted; only the multiples of 128 avoid the padding copies.
"""
from __future__ import annotations

import fnmatch
import functools
import importlib.util
from dataclasses import replace
from typing import Any, Callable

import torch
from torch import nn

from megads.fp8.dispatch import fp8_all_to_all
from megads.fp8.emulated import EmulatedBackend
from megads.fp8.grouped import FP8GroupedGemm
from megads.fp8.linear import FP8Gemm, FP8Recipe
from megads.model.layers import Linear
from megads.model.moe import GroupedExperts

DEFAULT_EXCLUDE = ("lm_head", "mtp.*.eh_proj")


def _check_torch_backend() -> None:
    fix = "; use fp8.backend=emulated"
    if not torch.cuda.is_available():
        raise ValueError("fp8.backend=torch needs a Hopper GPU (compute capability 9.x: torch._scaled_mm's "
                         f"1x128 / 128x128 blockwise scaling), but no CUDA device is available{fix}")
    major, minor = torch.cuda.get_device_capability()
    if major != 9:
        raise ValueError(f"fp8.backend=torch needs a Hopper GPU (compute capability 9.x: torch._scaled_mm's "
                         f"1x128 / 128x128 blockwise scaling), found compute capability {major}.{minor}{fix}")
    if importlib.util.find_spec("triton") is None:
        raise ValueError(f"fp8.backend=torch needs triton for its quantisation and expert kernels{fix}")


def build_recipe(cfg: Any) -> FP8Recipe:
    """cfg: megads.config.FP8Config (backend, power_of_two_scales, cache_fp8_activations)."""
    if cfg.backend == "emulated":
        backend = EmulatedBackend(cfg.power_of_two_scales)
    elif cfg.backend == "torch":
        _check_torch_backend()
        from megads.fp8.torch_backend import TorchBackend
        backend = TorchBackend(cfg.power_of_two_scales)
    else:
        raise ValueError(f"fp8.backend must be emulated or torch, got {cfg.backend!r}")
    return FP8Recipe(backend, cache_fp8_activations=cfg.cache_fp8_activations, cache_weights=cfg.cache_weights)


def excluded(name: str, patterns: tuple[str, ...]) -> bool:
    """True when the module or one of its parents matches a pattern (fnmatch on dotted names)."""
    parts = name.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes for pattern in patterns)


def fp8_strategies(model: nn.Module, recipe: FP8Recipe, exclude: tuple[str, ...],
                   strategies: dict[str, object]) -> dict[str, object]:
    """Module name -> its strategy with the FP8 GEMM, from the `strategies` given so far (a module's
    own when absent); modules matching DEFAULT_EXCLUDE or `exclude` keep theirs."""
    patterns = DEFAULT_EXCLUDE + tuple(exclude)
    out: dict[str, object] = {}
    for name, module in model.named_modules():
        if excluded(name, patterns):
            continue
        if isinstance(module, Linear):
            out[name] = replace(strategies.get(name, module.strategy), gemm=FP8Gemm(recipe))
        elif isinstance(module, GroupedExperts):
            out[name] = replace(strategies.get(name, module.strategy), gemm=FP8GroupedGemm(recipe))
    return out


def fp8_send_rows(recipe: FP8Recipe) -> Callable:
    """The expert-parallel dispatch exchange sending E4M3 rows with their scales (`fp8.dispatch`)."""
    return functools.partial(fp8_all_to_all, backend=recipe.backend)
