"""LoRA's input dropout on the CPU: torch's nn.Dropout against finetune.lora_dropout.CpuDropout, forward + backward
on one activation the size of a decoder layer's input, and the share of elements each drops.

    python benchmarks/dropout.py [--shape 8 400 256] [--p 0.05] [--repeats 50]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from finetune.lora_dropout import CpuDropout


def step_ms(dropout: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        dropout(x).backward(grad)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1e3  # the first call warms the allocator


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", type=int, nargs="+", default=[8, 400, 256])
    parser.add_argument("--p", type=float, default=0.05)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(*args.shape).requires_grad_()
    grad = torch.randn(*args.shape)
    print(f"input {tuple(args.shape)}, p={args.p}, {torch.get_num_threads()} thread(s); forward + backward, median:")
    for name, dropout in (("torch nn.Dropout", torch.nn.Dropout(args.p)), ("CpuDropout", CpuDropout(args.p))):
        dropout.train()
        ms = step_ms(dropout, x, grad, args.repeats)
        share = (dropout(torch.ones(1 << 22)) == 0).float().mean().item()
        print(f"  {name:<17} {ms:7.2f} ms   dropped {share:.4f}")


if __name__ == "__main__":
    main()
