"""The optimisation loop both embedded checkpoints are pre-trained with (tiny-llava, tiny-clip)."""

from __future__ import annotations

import math

import torch


def optimizer(params, lr: float, steps: int, warmup: int):
    """AdamW with linear warm-up and cosine decay: stable for from-scratch transformers."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    return opt, schedule


def step(loss, params, opt, schedule) -> None:
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    schedule.step()
    opt.zero_grad(set_to_none=True)
