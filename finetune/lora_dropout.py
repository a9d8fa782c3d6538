"""LoRA's input dropout, made cheap on the CPU.

peft puts an nn.Dropout in front of every LoRA layer. On the CPU, torch's dropout draws one 32-bit random number
per element (bernoulli_) from its Mersenne Twister; for a small decoder that costs more than the layer's matmuls (a
quarter of a step on the benchmarks/vs_trl.py fixture). `CpuDropout` uses 16 random bits per element, four per
64-bit word, and takes the words from numpy's PCG64, which makes them 3-4 times faster than torch's generator. Each
call seeds its PCG64 with one draw from torch's generator, so seeds, resumes and activation checkpointing (which
restore torch's RNG state) replay the masks as they replay torch's. On other devices (CUDA's dropout is one fused
kernel) and in eval mode it is torch's own dropout. No maintained library offers this: torch has no cheaper CPU
dropout, and peft takes whatever module sits in `lora_dropout`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

LEVELS = 1 << 16  # the drop probability is rounded to a multiple of 1/65536 (0.05 -> 0.0500031)


class CpuDropout(nn.Dropout):
    """nn.Dropout with a 16-bit mask on the CPU; the kept elements are scaled by 1 / (1 - the rounded p)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        drawn = self.keep_mask(x)
        if drawn is None:
            return super().forward(x)
        mask, scale = drawn  # autograd keeps the mask for the backward pass, like torch's own dropout
        return x * mask.mul_(scale)

    def keep_mask(self, x: torch.Tensor) -> tuple[torch.Tensor, float] | None:
        """This call's 0/1 mask in x's dtype and the scale of the kept elements; None where torch's dropout runs
        instead (eval mode, p of 0 or 1, in place, not on the CPU). finetune.lora_forward applies the scale to
        LoRA's r-wide product instead of to the mask."""
        dropped = round(self.p * LEVELS)
        if not self.training or x.device.type != "cpu" or dropped in (0, LEVELS) or self.inplace:
            return None
        # Four 16-bit lanes per 64-bit word, each uniform on [-32768, 32767], compared straight into x's dtype.
        lanes = torch.from_numpy(random_words((x.numel() + 3) // 4).view(np.int16)[: x.numel()]).view(x.shape)
        mask = torch.ge(lanes, dropped - LEVELS // 2, out=torch.empty(x.shape, dtype=x.dtype))
        return mask, LEVELS / (LEVELS - dropped)


def random_words(count: int) -> np.ndarray:
    """`count` uniform 64-bit words from a PCG64 seeded by one draw from torch's default CPU generator."""
    seed = int(torch.randint(0, 1 << 62, (1,)))
    return np.random.PCG64(seed).random_raw(count)


def use_cpu_dropout(model: nn.Module) -> int:
    """Swap every LoRA layer's nn.Dropout for a CpuDropout of the same p; returns how many were swapped."""
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name, dropout in dropouts.items():
            if type(dropout) is nn.Dropout:
                dropouts[name] = CpuDropout(dropout.p)
                swapped += 1
    return swapped
