"""The optimizer and its learning-rate schedule from the `optim` block: what `DistillModule.configure_optimizers`
builds, and what scripts build to train with exactly the module's optimizer (`scripts/batch_noise.py`)."""

from __future__ import annotations

import math

import torch

from dopd.settings import complete


def lr_schedule(optim: dict, total_steps: int):
    """The `optim` block's learning-rate multiplier per step: linear warmup, then cosine to `min_lr_ratio` at
    `total_steps` (or constant). A function of its own so scripts can train with exactly the module's schedule."""
    optim = complete("optim", optim)
    warmup, floor = int(optim["warmup_steps"]), optim["min_lr_ratio"]
    constant = optim["scheduler"] == "constant"

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if constant:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


def build_optimizer(parameters, optim: dict, total_steps: int):
    """AdamW and its per-step LambdaLR schedule from the `optim` block: the module's optimizer, and the one
    `scripts/batch_noise.py` trains with so that its runs differ from a distillation run only in their data."""
    optim = complete("optim", optim)
    opt = torch.optim.AdamW(parameters, lr=optim["lr"], weight_decay=optim["weight_decay"], betas=tuple(optim["betas"]))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(optim, total_steps))
