"""The fused LoRA forward (finetune.lora_forward): peft's values and gradients, and peft's own forward wherever
the layer is not plain LoRA."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from finetune.adapters import attach_adapters
from finetune.config import AdapterConfig
from finetune.lora_dropout import CpuDropout, use_cpu_dropout
from finetune.lora_forward import use_fused_lora_forward


def two_layers(dtype=torch.float32, **lora):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 48)).to(dtype)
    # alpha/r = 1.5: a scaling that is not a power of two, so applying it before B rounds differently from after
    config = LoraConfig(r=8, lora_alpha=12, target_modules=["0", "2"], **{"lora_dropout": 0.0, **lora})
    model = get_peft_model(base, config)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param)  # B starts at zero: with it, the LoRA path would add nothing to compare
    return model


def peft_forward_calls(monkeypatch):
    """Counts calls of peft's own LoRA Linear forward (the fused forward falls back to it)."""
    calls = []
    forward = LoraLinear.forward
    monkeypatch.setattr(LoraLinear, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    return calls


def run(model, x, seed=1):
    torch.manual_seed(seed)
    out = model(x)
    out.square().sum().backward()
    return out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_same_output_and_gradients_as_peft(dropout, monkeypatch):
    # In float64: the two forwards sum the same products in another order, and in float32 that reassociation moved a
    # gradient element by 9e-4 on one machine (1.6e-4 relative). In float64 it stays near 1e-13 on any machine, so
    # a tolerance of 1e-9 holds everywhere and still catches a wrong scaling or mask (errors of order 1).
    theirs = two_layers(torch.float64, lora_dropout=dropout)
    ours = copy.deepcopy(theirs)
    use_cpu_dropout(theirs), use_cpu_dropout(ours)  # the same masks from the same seed on both sides
    assert use_fused_lora_forward(ours) == 2
    calls = peft_forward_calls(monkeypatch)
    x = torch.randn(3, 5, 32, dtype=torch.float64)
    x_theirs = x.clone().requires_grad_()
    expected, expected_grads = run(theirs, x_theirs)
    assert len(calls) == 2
    x_ours = x.clone().requires_grad_()
    got, grads = run(ours, x_ours)
    assert len(calls) == 2  # the fused forward ran, not peft's
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, rtol=1e-9, atol=1e-9)
    assert grads.keys() == expected_grads.keys() and any("lora_A" in n for n in grads)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-9, atol=1e-9)


def test_16_bit_base_with_32_bit_adapter_keeps_peft_dtypes():
    theirs = two_layers(torch.bfloat16)
    for name, param in theirs.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()  # how finetune trains a 16-bit base: the adapter in fp32
    ours = copy.deepcopy(theirs)
    use_fused_lora_forward(ours)
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    expected, got = theirs(x), ours(x)
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)


def test_layers_that_are_not_plain_lora_run_peft_forward(monkeypatch):
    calls = peft_forward_calls(monkeypatch)
    x = torch.randn(2, 32)

    dora = two_layers(use_dora=True)
    expected = dora(x)
    use_fused_lora_forward(dora)
    calls.clear()
    torch.testing.assert_close(dora(x), expected)
    assert len(calls) == 2  # DoRA is a peft "variant": its own forward

    model = two_layers()
    reference = copy.deepcopy(model)
    use_fused_lora_forward(model)
    with reference.disable_adapter():
        base_only = reference(x)
    with_adapter = reference(x)
    calls.clear()
    with model.disable_adapter():
        torch.testing.assert_close(model(x), base_only)
    assert len(calls) == 2
    model.merge_adapter()
    torch.testing.assert_close(model(x), with_adapter, rtol=1e-5, atol=1e-5)
    assert len(calls) == 4
    model.unmerge_adapter()
    model(x)
    assert len(calls) == 4


def test_attach_adapters_fuses_every_lora_linear(random_tiny):
    from transformers import AutoModelForImageTextToText

    model = attach_adapters(AutoModelForImageTextToText.from_pretrained(random_tiny), AdapterConfig(dropout=0.1))
    lora_layers = [m for m in model.modules() if hasattr(m, "lora_A")]
    assert lora_layers and all("forward" in vars(m) for m in lora_layers)
    assert all(isinstance(m.lora_dropout["default"], CpuDropout) for m in lora_layers)
    # The adapter's saved weights keep peft's names: the fused forward changes no module or parameter.
    assert all(".lora_A.default.weight" in n or ".lora_B.default.weight" in n
               for n, p in model.named_parameters() if p.requires_grad)
