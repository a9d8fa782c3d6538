"""Render an Example with the model's own chat template and processor; label only the assistant replies.

How the labels are found, for any chat template: render the conversation up to each assistant turn
with `add_generation_prompt=True` and up to the end of that turn; the characters in between are the
reply (plus its end-of-turn token). Their token positions come from the tokenizer's offsets on the
rendered text, and are carried over to the processor's output (where each `<image>` became many
image tokens) by aligning the two token sequences. transformers' `return_assistant_tokens_mask`
would do this only for templates with `{% generation %}` markers, which most VLM templates lack.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import torch

from finetune.data.formats import IMAGE, Example
from finetune.data.images import open_image
from finetune.errors import DataError

IGNORE = -100


class TooLong(DataError):
    """The row cannot fit in data.max_length without cutting image tokens or every reply."""


class ChatEncoder:
    def __init__(self, processor, max_length: int, dtype: torch.dtype | None = None):
        """`dtype`: what floating inputs (pixel values) become; the model's own dtype, or None to keep fp32."""
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.max_length = max_length
        self.dtype = dtype
        self.image_token = getattr(processor, "image_token", IMAGE)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        if getattr(processor, "chat_template", None) is None and getattr(self.tokenizer, "chat_template", None) is None:
            raise DataError("the model's processor has no chat template; this model cannot be trained on chat data")

    # --- text -------------------------------------------------------------------------------------
    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The chat template's text, with each image part rendered by the template itself."""
        parts = [{"role": m["role"], "content": _content_parts(m["content"])} for m in messages]
        render = getattr(self.processor, "apply_chat_template", self.tokenizer.apply_chat_template)
        return render(parts, tokenize=False, add_generation_prompt=add_generation_prompt)

    def reply_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """(full text, character spans of every assistant reply including its end-of-turn token)."""
        full = self.render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            through = self.render(messages[: i + 1])
            if not (through.startswith(before) and full.startswith(through)):
                raise DataError("the chat template re-renders earlier turns; cannot locate assistant replies")
            # Whitespace the template puts after the end-of-turn token is not part of the reply.
            spans.append((len(before), len(through.rstrip())))
        return full, spans

    # --- one example -> model inputs -------------------------------------------------------------------
    def encode(self, example: Example, images: list | None = None) -> dict:
        """Model inputs + labels for one example; its images are opened here unless given already opened."""
        text, spans = self.reply_spans(example.messages)
        plain = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        plain_labels = [
            token if _in_reply(start, end, spans, text) else IGNORE
            for token, (start, end) in zip(plain["input_ids"], plain["offset_mapping"])
        ]
        if images is None:
            images = [open_image(value, example.root or Path.cwd()) for value in example.images]
        inputs = self.processor(
            text=[text], images=images or None, add_special_tokens=False, return_tensors="pt"
        ) if images else self.tokenizer([text], add_special_tokens=False, return_tensors="pt")
        input_ids = inputs["input_ids"][0].tolist()
        labels = _carry_labels(plain["input_ids"], plain_labels, input_ids, self.image_token_id)
        features = {"input_ids": input_ids, "labels": labels}
        seq_len = len(input_ids)
        for key, value in inputs.items():
            if key in ("input_ids", "offset_mapping"):
                continue
            if value.dim() == 2 and value.shape == (1, seq_len):  # attention mask, token type ids ...
                features[key] = value[0].tolist()
            else:
                features[key] = value.to(self.dtype) if self.dtype and value.is_floating_point() else value
        return self._fit(features)

    def _fit(self, features: dict) -> dict:
        length = len(features["input_ids"])
        if length <= self.max_length:
            return features
        ids = features["input_ids"]
        last_image = max((i for i, t in enumerate(ids) if t == self.image_token_id), default=-1)
        if last_image >= self.max_length - 1 or all(t == IGNORE for t in features["labels"][: self.max_length]):
            raise TooLong(f"{length} tokens do not fit in data.max_length={self.max_length}")
        for key, value in features.items():
            if isinstance(value, list) and len(value) == length:
                features[key] = value[: self.max_length]
        return features


def _content_parts(content: str) -> list[dict]:
    pieces = str(content).split(IMAGE)
    parts = []
    for i, piece in enumerate(pieces):
        if i:
            parts.append({"type": "image"})
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def _in_reply(start: int, end: int, spans, text: str) -> bool:
    for lo, hi in spans:
        if start < hi and end > lo and (start >= lo or text[lo:end].strip()):
            return True
    return False


def _carry_labels(plain_ids: list, plain_labels: list, ids: list, image_id: int) -> list:
    """Labels for the processor's ids, copied from the unexpanded tokenization by aligning the two."""
    if plain_ids == ids:
        return list(plain_labels)
    labels = [IGNORE] * len(ids)
    # Fast path: the processor only repeated image tokens (LLaVA, Qwen2-VL, ...).
    i = j = 0
    while i < len(plain_ids) and j < len(ids) and plain_ids[i] == ids[j]:
        labels[j] = plain_labels[i]
        if ids[j] == image_id:
            while j + 1 < len(ids) and ids[j + 1] == image_id:
                j += 1
        i, j = i + 1, j + 1
    if i == len(plain_ids) and j == len(ids):
        return labels
    # General path (processors that insert other tokens around images): match equal blocks.
    labels = [IGNORE] * len(ids)
    matcher = difflib.SequenceMatcher(a=plain_ids, b=ids, autojunk=False)
    for a, b, size in matcher.get_matching_blocks():
        labels[b : b + size] = plain_labels[a : a + size]
    return labels


class Collator:
    """Right-pads token lists into a batch and stacks the image tensors of all rows."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict:
        length = max(len(f["input_ids"]) for f in features)
        batch = {}
        keys = dict.fromkeys(k for f in features for k in f)  # text-only rows have no pixel_values
        for key in keys:
            values = [f[key] for f in features if key in f]
            if isinstance(values[0], list):
                pad = IGNORE if key == "labels" else self.pad_token_id if key == "input_ids" else 0
                batch[key] = torch.tensor([v + [pad] * (length - len(v)) for v in values])
            else:
                batch[key] = _concat(values)
        if "attention_mask" not in batch:
            batch["attention_mask"] = (torch.arange(length)[None] < torch.tensor(
                [len(f["input_ids"]) for f in features])[:, None]).long()
        return batch


def _concat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate per-row image tensors along dim 0, zero-padding other dims that differ (LLaVA-NeXT tiles)."""
    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    padded = []
    for t in tensors:
        if list(t.shape[1:]) != shape:
            grown = t.new_zeros((t.shape[0], *shape))
            grown[tuple(slice(0, s) for s in t.shape)] = t
            t = grown
        padded.append(t)
    return torch.cat(padded)
