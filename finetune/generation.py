"""Batched greedy generation from chat conversations, each answer cut at the model's end of turn."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from finetune.data.encode import make_encoder
from finetune.data.images import open_image
from finetune.precision import compute_dtype, inference_autocast

# (messages up to the reply, image values, folder that relative image paths are in)
Prompt = tuple[list[dict], list, Path]


def stop_token_ids(model, encoder) -> list[int]:
    """Where an answer ends: the template's end-of-turn tokens, the tokenizer's EOS and the checkpoint's own
    generation_config.eos_token_id (Gemma 3 and Qwen list several)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    return sorted({*encoder.end_of_turn_ids, *(t for t in configured if t is not None)})


def greedy_config(model, encoder, max_new_tokens: int) -> GenerationConfig:
    """Plain greedy decoding. Every setting that changes a greedy answer is given explicitly, because generate()
    fills the ones left unset from the checkpoint's generation_config (Qwen2.5-VL's repetition_penalty 1.05)."""
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, repetition_penalty=1.0,
                            no_repeat_ngram_size=0, length_penalty=1.0, min_new_tokens=0, temperature=None,
                            top_p=None, top_k=None, eos_token_id=stop_token_ids(model, encoder),
                            pad_token_id=encoder.pad_token_id)


@torch.no_grad()
def generate(model, processor, prompts: list[Prompt], max_new_tokens: int, batch_size: int = 16,
             quiet: bool = False, with_ends: bool = False) -> list:
    """Greedy, batched, left-padded generation; each answer cut at the first end-of-turn token.

    With `with_ends`, each answer is (text, ended): whether the model ended its turn itself rather than
    running out of max_new_tokens."""
    encoder = make_encoder(processor, max_length=10**9)
    config = greedy_config(model, encoder, max_new_tokens)
    stops = set(config.eos_token_id)
    device, dtype = model.device, compute_dtype(model)
    answers = []
    with inference_autocast(model):
        for start in tqdm(range(0, len(prompts), batch_size), desc="generating", disable=quiet, unit="batch"):
            batch = [(messages, [open_image(v, root) for v in values]) for messages, values, root in
                     prompts[start : start + batch_size]]
            inputs = encoder.prompt_inputs(batch)
            inputs = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}
            output = model.generate(**inputs, generation_config=config)
            for row in output[:, inputs["input_ids"].shape[1]:].tolist():
                text = answer_text(row, stops, encoder.tokenizer)
                answers.append((text, any(t in stops for t in row)) if with_ends else text)
    return answers


def answer_text(new_tokens: list[int], stops: set[int], tokenizer) -> str:
    """The generated tokens up to the first end-of-turn token, decoded without special tokens."""
    end = next((i for i, t in enumerate(new_tokens) if t in stops), len(new_tokens))
    return tokenizer.decode(new_tokens[:end], skip_special_tokens=True).strip()
