"""LoRA's input dropout, made cheap on the CPU.

peft puts an nn.Dropout in front of every LoRA layer. On the CPU, torch's dropout draws one 32-bit random number
per element (bernoulli_); for a small decoder that costs more than the layer's matmuls (a quarter of a step on the
benchmarks/vs_trl.py fixture). `CpuDropout` draws 16 random bits per element, four per 64-bit draw, from the same
generator, so seeds, resumes and activation checkpointing replay it as they replay torch's. On other devices
(CUDA's dropout is one fused kernel) and in eval mode it is torch's own dropout. No maintained library offers this:
torch has no cheaper CPU dropout, and peft takes whatever module sits in `lora_dropout`.
"""

from __future__ import annotations

import torch
from torch import nn

LEVELS = 1 << 16  # the drop probability is rounded to a multiple of 1/65536 (0.05 -> 0.0500031)


class CpuDropout(nn.Dropout):
    """nn.Dropout with a 16-bit mask on the CPU; the kept elements are scaled by 1 / (1 - the rounded p)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dropped = round(self.p * LEVELS)
        if not self.training or x.device.type != "cpu" or dropped in (0, LEVELS) or self.inplace:
            return super().forward(x)
        # Four 16-bit lanes per 64-bit draw, each uniform on [-32768, 32767]; the mask is written straight into
        # x's dtype and scaled, and autograd keeps it for the backward pass like torch's own.
        bits = torch.randint(-(1 << 63), (1 << 63) - 1, ((x.numel() + 3) // 4,), dtype=torch.int64)
        lanes = bits.view(torch.int16)[: x.numel()].view(x.shape)
        mask = torch.ge(lanes, dropped - LEVELS // 2, out=torch.empty(x.shape, dtype=x.dtype))
        return x * mask.mul_(LEVELS / (LEVELS - dropped))


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
