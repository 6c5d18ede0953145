"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedule hook."""
from __future__ import annotations

import torch
from torch import nn

from megads.config import TrainConfig, lr_at


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW(betas, eps); weight decay on parameters with >= 2 dims (norm weights are exempt).
    Fused on CUDA, foreach elsewhere."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=lr_at(cfg, 0), betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=fused, foreach=None if fused else True)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
