"""Optimizer and learning-rate schedule.

AdamW (Loshchilov & Hutter) over the trainable parameters only: with LoRA
these are the factors A and B, a fraction of a percent of the model.

The schedule is a pure function of the optimizer step, so resuming needs no
scheduler object state, only the step number:

    warmup:   lr(t) = peak · (t + 1) / warmup              for t < warmup
    constant: lr(t) = peak
    linear:   lr(t) = peak · (1 − p)                        p = (t − warmup) / (T − warmup)
    cosine:   lr(t) = peak · ½ · (1 + cos(π · p))

`t` counts optimizer steps from 0 and `T` is `train.max_steps`; the value for
step t is the one used by the update that step t performs.
"""
from __future__ import annotations

import math

import torch

from engine.recipe import TrainConfig


def build_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    # foreach=False keeps the update a plain per-tensor loop: the same
    # arithmetic on every platform, which the bit-exact resume test relies on.
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, foreach=False)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.scheduler == "constant":
        return cfg.lr
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.scheduler == "linear":
        return cfg.lr * (1.0 - progress)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
