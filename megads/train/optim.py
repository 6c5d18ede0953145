"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedule hook."""
from __future__ import annotations

import torch
from torch import nn

from megads.config import TrainConfig, lr_at
from megads.parallel.plan import ParallelPlan


def build_optimizer(model: nn.Module, plan: ParallelPlan, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW(betas, eps); weight decay where the plan says it decays (matrices; norm weights are
    exempt). Expert-parallel parameters get groups of their own (`expert: True`), so that data
    parallelism can reduce and partition them over the expert-data-parallel group. Fused on CUDA,
    foreach elsewhere."""
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            placement = plan.of(p)
            buckets.setdefault((placement.decays, placement.expert), []).append(p)
    groups = [{"params": params, "weight_decay": cfg.weight_decay if decay else 0.0, "expert": expert}
              for (decay, expert), params in sorted(buckets.items(), key=lambda kv: (not kv[0][0], kv[0][1]))]
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=lr_at(cfg, 0), betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=fused, foreach=None if fused else True)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
