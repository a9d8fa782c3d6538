"""LoRA's CPU dropout: the statistics and gradients of nn.Dropout, seeded replay, and peft's modules swapped."""

import pytest
import torch
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForImageTextToText

from finetune.adapters import attach_adapters
from finetune.config import AdapterConfig
from finetune.lora_dropout import LEVELS, CpuDropout

N = 1 << 20  # elements per draw: the drop share's standard deviation at p=0.05 is 0.0002


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_drops_a_share_p_of_every_lane_and_scales_the_rest(p):
    torch.manual_seed(0)
    x = torch.rand(N) + 0.5  # no zeros: a zero in the output means dropped
    out = CpuDropout(p).train()(x)
    dropped = out == 0
    # Each 64-bit draw feeds four 16-bit lanes: a lane whose bits were not uniform would drop at another rate.
    for lane in range(4):
        assert dropped.view(-1, 4)[:, lane].float().mean().item() == pytest.approx(p, abs=0.004)
    rounded = round(p * LEVELS) / LEVELS
    assert torch.equal(out[~dropped], x[~dropped] * (1 / (1 - rounded)))
    assert out.mean().item() == pytest.approx(x.mean().item(), rel=0.01)  # the expectation is kept


def test_same_statistics_as_torch_dropout():
    torch.manual_seed(1)
    x = torch.ones(N)
    ours, theirs = CpuDropout(0.05).train()(x), torch.nn.functional.dropout(x, 0.05, training=True)
    assert (ours == 0).float().mean().item() == pytest.approx((theirs == 0).float().mean().item(), abs=0.002)
    assert ours.max().item() == pytest.approx(theirs.max().item(), rel=1e-5)


def test_gradient_is_the_mask_times_the_scale():
    torch.manual_seed(2)
    x = (torch.rand(64, 300) + 0.5).requires_grad_()
    out = CpuDropout(0.2).train()(x)
    grad = torch.randn_like(out)
    out.backward(grad)
    kept = (out != 0).float()
    assert torch.allclose(x.grad, grad * kept / (1 - round(0.2 * LEVELS) / LEVELS))
    assert 0 < kept.mean() < 1


def test_eval_mode_zero_p_and_bf16():
    x = torch.randn(8, 16)
    assert torch.equal(CpuDropout(0.3).eval()(x), x)
    assert torch.equal(CpuDropout(0.0).train()(x), x)
    out = CpuDropout(0.5).train()(x.bfloat16())
    assert out.dtype == torch.bfloat16 and (out == 0).any()


def test_seeded_draws_repeat_and_checkpointing_replays_the_mask():
    dropout, layer = CpuDropout(0.3).train(), torch.nn.Linear(32, 8)
    x = torch.randn(4, 32)
    torch.manual_seed(3)
    first = dropout(x)
    torch.manual_seed(3)
    assert torch.equal(dropout(x), first)
    assert not torch.equal(dropout(x), first)

    def grads(checkpointed: bool):
        layer.zero_grad()
        torch.manual_seed(4)
        step = (lambda t: checkpoint(lambda u: layer(dropout(u)), t, use_reentrant=False)) if checkpointed else (
            lambda t: layer(dropout(t)))
        step(x.clone().requires_grad_()).square().sum().backward()
        return layer.weight.grad.clone()

    assert torch.equal(grads(True), grads(False))  # the recomputed forward drew the same mask


def test_attach_adapters_swaps_every_lora_dropout(random_tiny):
    model = AutoModelForImageTextToText.from_pretrained(random_tiny)
    peft_model = attach_adapters(model, AdapterConfig(dropout=0.1))
    dropouts = [m.lora_dropout["default"] for m in peft_model.modules() if hasattr(m, "lora_dropout")]
    assert dropouts and all(type(d) is CpuDropout and d.p == 0.1 for d in dropouts)
    plain = attach_adapters(AutoModelForImageTextToText.from_pretrained(random_tiny), AdapterConfig(dropout=0.0))
    assert all(type(m.lora_dropout["default"]) is torch.nn.Identity
               for m in plain.modules() if hasattr(m, "lora_dropout"))
