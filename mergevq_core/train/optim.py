"""Optimisers and learning-rate schedules as pure functions of the step (exact on resume by construction)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import TrainLoopConfig


def lr_at(step: int, cfg: TrainLoopConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then `step` (×0.1 at each fraction of
    `lr_drops`) or `cosine` (to 0 at `total_steps`)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        span = max(1, total_steps - cfg.warmup_steps)
        t = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * t))
    drops = sum(1 for f in cfg.lr_drops if step >= int(f * total_steps))
    return cfg.lr * 0.1**drops


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def adamw(params: list[nn.Parameter], cfg: TrainLoopConfig, fused: bool = False) -> torch.optim.AdamW:
    """AdamW over `params`; with weight decay only on matrices and kernels (ndim ≥ 2), never on norms,
    biases or LayerScale gammas. Stage 1 uses weight_decay 0 (paper Table A1) so the split only matters when set."""
    decay = [p for p in params if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in params if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, **kwargs)
