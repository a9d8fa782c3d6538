"""Batched greedy generation from chat conversations, each answer cut at the model's end of turn."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from finetune.data.collate import ChatEncoder
from finetune.data.images import open_image

# (messages up to the reply, image values, folder that relative image paths are in)
Prompt = tuple[list[dict], list, Path]


@torch.no_grad()
def generate(model, processor, prompts: list[Prompt], max_new_tokens: int, batch_size: int = 16,
             quiet: bool = False) -> list[str]:
    """Greedy, batched, left-padded generation; each answer cut at the end-of-turn token."""
    encoder = ChatEncoder(processor, max_length=10**9)
    tokenizer = encoder.tokenizer
    device, dtype = model.device, model.dtype
    answers = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="generating", disable=quiet, unit="batch"):
        batch = prompts[start : start + batch_size]
        texts = [encoder.render(messages, add_generation_prompt=True) for messages, _, _ in batch]
        images = [open_image(v, root) for _, values, root in batch for v in values]
        # Left padding (per call, the processor itself is not changed): new tokens must follow every prompt.
        if images:
            inputs = processor(text=texts, images=images, padding=True, padding_side="left",
                               add_special_tokens=False, return_tensors="pt")
        else:
            inputs = tokenizer(texts, padding=True, padding_side="left", add_special_tokens=False,
                               return_tensors="pt")
        inputs = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        answers += [cut_at_end_of_turn(tokenizer.decode(t, skip_special_tokens=False), tokenizer)
                    for t in new_tokens]
    return answers


def cut_at_end_of_turn(text: str, tokenizer) -> str:
    """The reply up to the first end-of-turn token, without special tokens."""
    stops = {tokenizer.eos_token, tokenizer.pad_token, *getattr(tokenizer, "additional_special_tokens", [])}
    stops.discard(None)
    stops.discard("<image>")
    cut = len(text)
    for stop in stops:
        position = text.find(stop)
        if position != -1:
            cut = min(cut, position)
    return text[:cut].strip()
