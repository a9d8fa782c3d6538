"""LoRA's forward pass with fewer passes over the layer's output, on the CPU.

peft computes a LoRA Linear as `result + lora_B(lora_A(dropout(x))) * scaling`: three full-width tensors (B's
output, its scaled copy, the sum) and, backwards, a full-width `grad * scaling`. For a small decoder on a CPU
those passes over memory cost as much as the matmuls beside them. Here the scaling is applied to A's r-wide
output instead and B's product is added to the base output inside the matmul (`addmm_`), which leaves the
one full-width output (the base layer's, added to in place) and the same values and gradients. No maintained
library offers this for peft's layers.

The fast path covers plain LoRA only (one active adapter, no DoRA or other variant, not merged, no per-row
adapter names) around a plain nn.Linear on the CPU; everything else runs peft's own forward.
"""

from __future__ import annotations

import types

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from finetune.lora_dropout import CpuDropout


def lora_linear_forward(self: LoraLinear, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    adapter = _plain_adapter(self, x, args, kwargs)
    if adapter is None:
        return LoraLinear.forward(self, x, *args, **kwargs)
    # In 2-D, so the base layer's output is a fresh tensor that B's product can be added into in place (autograd
    # allows it: a Linear keeps its input for the backward pass, not its output).
    flat = x.reshape(-1, x.shape[-1])
    result = self.base_layer(flat)
    lora_a, lora_b = self.lora_A[adapter], self.lora_B[adapter]
    # (A x) s is r wide where B (A x) s is the layer's full width: the same product, scaled where it is cheap;
    # CpuDropout's scale for the kept elements goes there too, instead of into a full-width mask.
    flat, scaling, dropout = flat.to(lora_a.weight.dtype), self.scaling[adapter], self.lora_dropout[adapter]
    drawn = dropout.keep_mask(flat) if isinstance(dropout, CpuDropout) else None
    if drawn is None:
        hidden = lora_a(dropout(flat)) * scaling
    else:
        mask, keep_scale = drawn
        hidden = lora_a(flat * mask) * (scaling * keep_scale)
    if result.dtype == lora_b.weight.dtype:
        result.addmm_(hidden, lora_b.weight.t())
    else:  # a 16-bit base with a 32-bit adapter: peft adds in the adapter's dtype, then casts back
        result = torch.addmm(result.to(lora_b.weight.dtype), hidden, lora_b.weight.t()).to(result.dtype)
    return result.view(*x.shape[:-1], result.shape[-1])


def _plain_adapter(layer: LoraLinear, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
    """The one active adapter when this call is plain LoRA on the CPU, else None (peft's forward then runs)."""
    if args or kwargs or x.device.type != "cpu" or layer.disable_adapters or layer.merged:
        return None
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1 or active[0] in layer.lora_variant or layer.lora_B[active[0]].bias is not None:
        return None
    return active[0]


def use_fused_lora_forward(model: nn.Module) -> int:
    """Give every peft LoRA Linear around an nn.Linear the fused forward; returns how many were changed."""
    changed = 0
    for module in model.modules():
        if type(module) is LoraLinear and type(module.get_base_layer()) is nn.Linear:
            module.forward = types.MethodType(lora_linear_forward, module)
            changed += 1
    return changed
