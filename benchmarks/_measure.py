"""What both benchmark runners record, measured the same way in each (imported by the runner scripts only).

- the time from the parent's spawn of the process (BENCH_T0) to the end of the first optimizer step;
- the training time, from Trainer's on_train_begin to on_train_end, and the steady rate: the tokens of steps 2..N
  over the time from the end of step 1 to the end of step N (without start-up work such as CUDA kernel selection).
  The GPU is synchronized only at those four points, never at every step: a sync per step would keep the host from
  queueing the next step's kernels while the GPU still runs the last, which neither trainer does on its own;
- per batch the model actually stepped on: the tokens of its examples and the tokens of the tensor
  (`input_ids.numel()`, padding included), counted by wrapping the trainer's data collator, and from them the
  non-pad tokens per optimizer step, which must be the same for both sides for their rates to compare;
- the peak GPU memory (torch.cuda.max_memory_allocated) where there is a GPU.

The figures go to the JSON file named by BENCH_OUT. Peak RSS and whole-process time are measured by the parent.
"""

from __future__ import annotations

import json
import os
import time

import torch
from transformers import TrainerCallback


class CountingCollator:
    """Wraps a collator: per batch, (example tokens, tensor tokens). An example's tokens are its attention-mask
    ones in a padded batch; a packed batch has no attention mask, and then they are counted from the encoded
    examples the collator was given (each example's `input_ids`)."""

    def __init__(self, collate):
        self.collate = collate
        self.batches: list[tuple[int, int]] = []

    def __call__(self, features):
        batch = self.collate(features)
        total = batch["input_ids"].numel()
        if "attention_mask" in batch:
            real = int(batch["attention_mask"].sum())
        else:
            real = sum(len(f["input_ids"]) for f in features)
        self.batches.append((real, total))
        return batch


class BenchCallback(TrainerCallback):
    def __init__(self, counter: CountingCollator | None = None):
        self.counter = counter  # may be set later, once the runner has the trainer's collator
        self.start = self.first_step = self.last_step = None
        self.model_facts: dict = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # What is trained and what is 4-bit, so a table can show both sides trained the same thing.
        trained = [p for p in model.parameters() if p.requires_grad] if model is not None else []
        self.model_facts = {
            "trainable_parameters": sum(p.numel() for p in trained),
            "trainable_dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in trained}),
            "linear4bit_layers": sum(type(m).__name__ == "Linear4bit" for m in model.modules()),
            "activation_checkpointing": any(getattr(m, "gradient_checkpointing", False) for m in model.modules()),
        } if model is not None else {}
        self.start = synced_time()

    def on_step_end(self, args, state, control, **kwargs):
        # Only the ends of step 1 and of the last step are timed (see the module's docstring).
        if state.global_step == 1:
            self.first_step = synced_time()
        elif state.global_step == state.max_steps:
            self.last_step = synced_time()

    def on_train_end(self, args, state, control, **kwargs):
        end = synced_time()
        accumulation = args.gradient_accumulation_steps
        # The dataloader fetches one batch ahead: count only the batches that were stepped on.
        stepped = self.counter.batches[: state.global_step * accumulation]
        real, total = sum(r for r, _ in stepped), sum(t for _, t in stepped)
        each_step = [sum(r for r, _ in stepped[i:i + accumulation]) for i in range(0, len(stepped), accumulation)]
        steady = sum(each_step[1:]) / (self.last_step - self.first_step) if self.last_step is not None else None
        t0 = float(os.environ.get("BENCH_T0", "nan"))
        result = {
            "steps": state.global_step,
            "logging_steps": args.logging_steps,
            "train_s": end - self.start,
            "first_step_s": self.first_step - t0 if self.first_step else None,
            "real_tokens": real,
            "tensor_tokens": total,
            "tokens_per_step": real / state.global_step if state.global_step else None,
            "tokens_each_step": each_step,
            "padding": 1 - real / total if total else None,
            "tokens_per_s": real / (end - self.start),
            "steady_tokens_per_s": steady,
            "peak_gpu_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
            **self.model_facts,
        }
        out = os.environ.get("BENCH_OUT")
        if out:
            with open(out, "w") as f:
                json.dump(result, f)
        print(f"[bench] {json.dumps(result)}", flush=True)


def synced_time() -> float:
    """The wall clock once the GPU has finished the work queued so far."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.time()


def log(message: str) -> None:
    """A progress line with the wall-clock time (the runners' output is unbuffered: PYTHONUNBUFFERED=1)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)
