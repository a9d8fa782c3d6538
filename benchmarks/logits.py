"""What computing logits only at supervised positions saves: one training step (forward + backward) of a
LLaVA-shaped model with a real vocabulary, full logits (the model's own loss) against `logits_to_keep`
(finetune.training.SupervisedLogitsLoss), on the CPU.

    python benchmarks/logits.py [--vocab 32064] [--hidden 256] [--batch 8] [--length 512] [--answer 48] [--steps 5]

Each row of the batch is a prompt of `length - answer` tokens followed by an `answer`-token reply (the supervised
part), as in VQA / captioning data. Prints the median step time and the peak of the step's allocations.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from finetune.training import SupervisedLogitsLoss


def build(vocab: int, hidden: int) -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    text = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8)
    return LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_index=vocab - 1))


def step(model, batch: dict, labels: torch.Tensor, keep_only: bool) -> float:
    start = time.perf_counter()
    if keep_only:
        loss_fn = SupervisedLogitsLoss()
        loss = loss_fn(model(**batch, logits_to_keep=loss_fn.positions(labels)), labels)
    else:
        loss = model(**batch, labels=labels).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=32064)  # LLaVA-1.5's
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--answer", type=int, default=48)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    model = build(args.vocab, args.hidden)
    input_ids = torch.randint(0, args.vocab - 2, (args.batch, args.length))
    labels = torch.full_like(input_ids, -100)
    labels[:, -args.answer:] = input_ids[:, -args.answer:]
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    print(f"vocabulary {args.vocab}, hidden {args.hidden}, batch {args.batch} x {args.length} tokens, "
          f"{args.answer} supervised per row, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for keep_only in (False, True):
        step(model, batch, labels, keep_only)  # warm-up
        times = [step(model, batch, labels, keep_only) for _ in range(args.steps)]
        torch_peak = _peak_bytes(model, batch, labels, keep_only)
        name = "logits at supervised positions" if keep_only else "full logits (the model's own loss)"
        print(f"{name:<36} step {statistics.median(times):.3f} s (median of {args.steps}), "
              f"peak step allocations {torch_peak / 2**20:.0f} MiB")


def _peak_bytes(model, batch, labels, keep_only: bool) -> int:
    """The largest total of live tensor bytes during one step, from torch's CPU allocation profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(model, batch, labels, keep_only)
    live, peak = 0, 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.cpu_memory_usage
        peak = max(peak, live)
    return peak


if __name__ == "__main__":
    main()
