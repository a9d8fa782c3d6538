"""One LoRA Linear on the CPU, forward + backward: peft's forward against finetune.lora_forward's, both with
finetune.lora_dropout.CpuDropout (so only the forward differs), alternated.

    python benchmarks/lora_layer.py [--tokens 2784] [--features 256 768] [--r 16] [--dropout 0.05] [--repeats 10]

The default shape is an MLP up-projection of the vs_trl fixture's longest batch (8 rows x 348 tokens, 256 -> 768).
"""

from __future__ import annotations

import argparse
import statistics
import time
import types

import torch

from finetune.lora_dropout import use_cpu_dropout
from finetune.lora_forward import LoraLinear, lora_linear_forward


def step_ms(model: torch.nn.Module, x: torch.Tensor, steps: int = 20) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        model(x).sum().backward()
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=2784)
    parser.add_argument("--features", type=int, nargs=2, default=[256, 768], metavar=("IN", "OUT"))
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    # peft after finetune, which quiets bitsandbytes' start-up notice
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=args.dropout, target_modules=["0"])
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(*args.features)), config)
    use_cpu_dropout(model)
    layer = next(m for m in model.modules() if isinstance(m, LoraLinear))
    x = torch.randn(args.tokens, args.features[0], requires_grad=True)  # as in a decoder: the input needs a gradient
    forwards = {"peft's forward": types.MethodType(LoraLinear.forward, layer),
                "finetune.lora_forward": types.MethodType(lora_linear_forward, layer)}
    times = {name: [] for name in forwards}
    for i in range(args.repeats + 1):
        for name, forward in forwards.items() if i % 2 else reversed(forwards.items()):
            layer.forward = forward
            ms = step_ms(model, x)
            if i:  # the first round warms the allocator
                times[name].append(ms)
    print(f"LoRA Linear {args.features[0]} -> {args.features[1]}, r={args.r}, dropout {args.dropout}, "
          f"{args.tokens} tokens, {torch.get_num_threads()} thread(s); forward + backward, median of {args.repeats}:")
    for name, values in times.items():
        print(f"  {name:<22} {statistics.median(values):7.2f} ms")


if __name__ == "__main__":
    main()
