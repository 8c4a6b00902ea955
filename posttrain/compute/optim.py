"""AdamW with warmup + cosine/linear/constant decay, on trainable parameters only."""

from __future__ import annotations

import math

import torch

from ..config import TrainConfig


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            # no weight decay on biases and norm weights (1-d), as in GPT-2 / LLaMA recipes
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas)


def lr_lambda(cfg: TrainConfig, total_steps: int):
    """Multiplier of the peak lr for optimizer step `s` (0-based): linear warmup, then decay to
    `min_lr_ratio` at the last step."""

    def f(s: int) -> float:
        if s < cfg.warmup_steps:
            return (s + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        span = max(1, total_steps - cfg.warmup_steps - 1)
        progress = min(1.0, (s - cfg.warmup_steps) / span)
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape

    return f


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total_steps))
