"""The policy model for SFT and GRPO: built and sharded like pretraining's, started from a
checkpoint of any layout; per-token log-probabilities that never gather the vocabulary under
TP (the vocabulary-parallel maths lives in parallel/tensor.py); routing capture and replay for
the MoE layers."""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch

from megads.checkpoint import load_model_weights
from megads.config import Config
from megads.model.deepseek_v3 import DeepSeekV3
from megads.model.moe import Router
from megads.parallel.builder import build_model
from megads.parallel.mesh import Mesh
from megads.parallel.plan import ParallelPlan


def build_policy(cfg: Config, mesh: Mesh, device: torch.device, init: str | None) -> tuple[DeepSeekV3, ParallelPlan]:
    """The model of `cfg.model` sharded over `mesh` and its plan, with the weights of checkpoint
    `init` (any layout), or the seeded initialisation of pretraining when `init` is None."""
    # No FP8, no pipeline (refused for SFT / GRPO); eager layers: generation changes their shapes every token.
    built = build_model(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compile="none")), mesh, device)
    if init is not None:
        load_model_weights(init, built.model, built.plan)
    # Post-training runs no MTP depth: frozen, they keep their pretrained weights under every
    # optimizer (ZeRO's flat partitions would otherwise weight-decay them without a gradient).
    built.model.mtp.requires_grad_(False)
    return built.model, built.plan


def build_reference(cfg: Config, mesh: Mesh, device: torch.device, init: str | None) -> DeepSeekV3:
    """The frozen reference for the KL penalty: the starting weights, without gradients (rebuilt
    from `init`, so a resumed run keeps the original reference)."""
    return build_policy(cfg, mesh, device, init)[0].requires_grad_(False)


def decoder_routers(model: DeepSeekV3) -> dict[str, Router]:
    """The router of every MoE decoder layer, by layer index (MTP depths are not run here)."""
    return {name: layer.mlp.gate for name, layer in model.layers.items() if isinstance(getattr(layer.mlp, "gate", None), Router)}


@contextlib.contextmanager
def capture_routes(model: DeepSeekV3) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, `routes[layer]` holds the expert ids [t, k] that layer's router chose in
    the latest forward (t: this rank's routed tokens)."""
    routes: dict[str, torch.Tensor] = {}
    handles = [router.register_forward_hook(lambda _, __, out, name=name: routes.__setitem__(name, out[0]))
               for name, router in decoder_routers(model).items()]
    try:
        yield routes
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def replay_routes(model: DeepSeekV3, routes: dict[str, torch.Tensor] | None) -> Iterator[None]:
    """Within the block, every MoE decoder layer uses the experts `routes[layer]` [b, s, k] for the
    tokens [b, s] of the forward instead of choosing them (routing replay). None: no replay."""
    with contextlib.ExitStack() as stack:
        for name, router in (decoder_routers(model) if routes is not None else {}).items():
            stack.enter_context(router.replay(routes[name]))
        yield


def token_logprobs(model: DeepSeekV3, tokens: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(tokens[:, 1:] | prefix) of the temperature-scaled policy [b, s-1] (differentiable),
    and the logits / temperature [b, s-1, vocab shard] (fp32) they come from."""
    b = tokens.shape[0]
    logits = model.logits(model.hidden_states(tokens[:, :-1])).float() / temperature
    logp = -model.token_losses(logits.flatten(0, 1), tokens[:, 1:].flatten()).view(b, -1)
    return logp, logits
