"""Render an Example with the model's own chat template and processor; label only the assistant replies.

How the labels are found, for any chat template: render the conversation up to each assistant turn
with `add_generation_prompt=True` and up to the end of that turn; the characters in between are the
reply (plus its end-of-turn token). Their token positions come from the tokenizer's offsets on the
rendered text, and are carried over to the processor's output (where each `<image>` became many
image tokens) by aligning the two token sequences. transformers' `return_assistant_tokens_mask`
would do this only for templates with `{% generation %}` markers, which most VLM templates lack.

Published templates differ in what they leave out; the encoder makes every family see the same thing:
BOS exactly once, an end-of-turn token after every reply (the model's EOS where the template writes none),
and no literal stand-ins for it (see `finetune.quirks`).
"""

from __future__ import annotations

import difflib
from pathlib import Path

import torch
from transformers.utils import chat_template_utils

from finetune.data.formats import IMAGE, Example
from finetune.data.images import open_image
from finetune.errors import DataError
from finetune.quirks import LITERAL_END_MARKERS, is_prefix_lm

IGNORE = -100


class TooLong(DataError):
    """The row cannot fit in data.max_length without cutting image tokens or every reply."""

    def __init__(self, message: str, length: int):
        super().__init__(message)
        self.length = length


def make_encoder(processor, max_length: int, dtype: torch.dtype | None = None):
    """The encoder for this processor: chat-template based, or prefix/suffix for prefix-LM models."""
    if is_prefix_lm(processor):
        return PrefixLMEncoder(processor, max_length, dtype)
    return ChatEncoder(processor, max_length, dtype)


class _Encoder:
    def __init__(self, processor, max_length: int, dtype: torch.dtype | None = None):
        """`dtype`: what floating inputs (pixel values) become; the model's own dtype, or None to keep fp32."""
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.max_length = max_length
        self.dtype = dtype
        self.image_token_id = image_token_id(processor)
        self.pad_token_id = self.tokenizer.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = self.tokenizer.eos_token_id

    def _features(self, inputs, labels: list[int]) -> dict:
        """The processor's outputs for one row as features: per-token lists, other tensors kept as they are."""
        input_ids = inputs["input_ids"][0].tolist()
        features = {"input_ids": input_ids, "labels": labels}
        for key, value in inputs.items():
            # The processor's own labels (PaliGemma always returns some) never replace ours.
            if key in ("input_ids", "offset_mapping", "labels"):
                continue
            if value.dim() == 2 and value.shape == (1, len(input_ids)):  # attention mask, token type ids ...
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
            raise TooLong(f"{length} tokens do not fit in data.max_length={self.max_length}", length)
        for key, value in features.items():
            if isinstance(value, list) and len(value) == length:
                features[key] = value[: self.max_length]
        return features

    def _process(self, **kwargs):
        """The processor on one row or batch; what it rejects (an image too small, a bad size) is the row's fault."""
        try:
            return self.processor(**kwargs, return_tensors="pt")
        except (ValueError, TypeError, IndexError, KeyError, RuntimeError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DataError(f"the processor rejected the row: {first}") from None


class ChatEncoder(_Encoder):
    def __init__(self, processor, max_length: int, dtype: torch.dtype | None = None):
        super().__init__(processor, max_length, dtype)
        if getattr(processor, "chat_template", None) is None and getattr(self.tokenizer, "chat_template", None) is None:
            raise DataError("the model's processor has no chat template; this model cannot be trained on chat data")
        template = getattr(processor, "chat_template", None) or self.tokenizer.chat_template
        self.template = template["default"] if isinstance(template, dict) else template
        # Plain JSON types, as render_jinja_template makes them (on every call; here once).
        self.template_kwargs = chat_template_utils._plain_template_data(dict(self.tokenizer.special_tokens_map))
        self.bos = self.tokenizer.bos_token if _tokenizer_adds_bos(self.tokenizer) else None
        self.eos = self.tokenizer.eos_token
        self._end_of_turn: set[int] | None = None

    # --- text -------------------------------------------------------------------------------------
    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The chat template's text (each image part rendered by the template itself), with literal stand-ins
        for the end-of-sequence token replaced and the tokenizer's BOS in front when the template omits it."""
        parts = [{"role": str(m["role"]), "content": _content_parts(m["content"])} for m in messages]
        try:
            # What processor.apply_chat_template(tokenize=False) renders, from transformers' compiled (sandboxed)
            # template, without the per-call set-up of either: that set-up turns the inputs into plain JSON types,
            # which these parts already are, and cost more than the rendering itself (the data check renders
            # every row at least twice).
            text = _compiled(self.template).render(messages=parts, tools=None, documents=None,
                                                   add_generation_prompt=add_generation_prompt, **self.template_kwargs)
        except Exception as err:  # noqa: BLE001 - jinja's raise_exception and template bugs: the row's message
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DataError(f"the chat template rejected the row: {first}") from None
        if self.eos:
            for marker in LITERAL_END_MARKERS:
                text = text.replace(marker, self.eos)
        if self.bos and not text.startswith(self.bos):
            text = self.bos + text
        return text

    def conversation(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[str, list]:
        """(text, character spans of every assistant reply including its end-of-turn token).

        Where the template ends a reply without any special token (LLaVA's vicuna templates end it with a
        space), the model's EOS is written after the reply, so the model learns to stop."""
        full = self.render(messages, add_generation_prompt)
        replies = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            last = i == len(messages) - 1 and not add_generation_prompt
            through = full if last else self.render(messages[: i + 1])
            if not (through.startswith(before) and full.startswith(through)):
                raise DataError("the chat template re-renders earlier turns; cannot locate assistant replies")
            content = str(message["content"]).strip()
            found = through.find(content, len(before)) if content else -1
            end = len(through.rstrip())  # whitespace after the end-of-turn token is not part of the reply
            replies.append((len(before), found + len(content) if found >= 0 else None, end))
        text, spans, shift = full, [], 0
        for start, content_end, end in replies:
            # Only whitespace after the reply: the template writes no end-of-turn marker (LLaVA's vicuna style).
            if self.eos and content_end is not None and not full[content_end:end].strip():
                at = content_end + shift
                text = text[:at] + self.eos + text[at:]
                spans.append((start + shift, at + len(self.eos)))
                shift += len(self.eos)
            else:
                spans.append((start + shift, end + shift))
        return text, spans

    @property
    def end_of_turn_ids(self) -> set[int]:
        """The special tokens that end an assistant turn in this template (plus EOS): generation stops there."""
        if self._end_of_turn is None:
            messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
            text, spans = self.conversation(messages)
            start, end = spans[-1]
            tail = text[start:end].split("Hello", 1)[-1]
            # Special or added tokens (transformers 5 lists Gemma's <end_of_turn> only among the added ones).
            special = set(self.tokenizer.all_special_ids) | set(self.tokenizer.get_added_vocab().values())
            ids = self.tokenizer(tail, add_special_tokens=False)["input_ids"]
            self._end_of_turn = ({t for t in ids if t in special} | {self.tokenizer.eos_token_id}) - {None}
        return self._end_of_turn

    # --- one example -> model inputs -------------------------------------------------------------------
    def encode(self, example: Example, images: list | None = None) -> dict:
        """Model inputs + labels for one example; its images are opened here unless given already opened."""
        text, spans = self.conversation(list(example.messages))
        plain = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        plain_labels = [
            token if _in_reply(start, end, spans, text) else IGNORE
            for token, (start, end) in zip(plain["input_ids"], plain["offset_mapping"])
        ]
        if images is None:
            images = [open_image(value, example.root or Path.cwd()) for value in example.images]
        if images:
            inputs = self._process(text=[text], images=[images], add_special_tokens=False)
        else:
            inputs = self.tokenizer([text], add_special_tokens=False, return_tensors="pt")
        labels = _carry_labels(plain["input_ids"], plain_labels, inputs["input_ids"][0].tolist(), self.image_token_id)
        return self._features(inputs, labels)

    def prompt_inputs(self, prompts: list[tuple[list[dict], list]]):
        """A left-padded batch of generation prompts: (messages before the reply, opened images) each."""
        texts = [self.conversation(messages, add_generation_prompt=True)[0] for messages, _ in prompts]
        if any(images for _, images in prompts):
            return self._process(text=texts, images=[images for _, images in prompts], padding=True,
                                 padding_side="left", add_special_tokens=False)
        return self.tokenizer(texts, padding=True, padding_side="left", add_special_tokens=False,
                              return_tensors="pt")


class PrefixLMEncoder(_Encoder):
    """PaliGemma-style models: no chat template; the processor builds `<image>... <bos>prefix\\n` + suffix, marks the
    suffix with token_type_ids=1 (the prefix attends bidirectionally) and labels the suffix and its EOS."""

    def __init__(self, processor, max_length: int, dtype: torch.dtype | None = None):
        super().__init__(processor, max_length, dtype)
        self.bos, self.eos = self.tokenizer.bos_token, self.tokenizer.eos_token

    def _prefix(self, messages: list[dict]) -> str:
        roles = [m["role"] for m in messages]
        if roles != ["user"]:
            raise DataError(f"{type(self.processor).__name__} models take one question and one answer per row "
                            f"(a prefix and a suffix), not a {'/'.join(roles + ['assistant'])} conversation")
        return str(messages[0]["content"]).replace(IMAGE, "").strip()

    def encode(self, example: Example, images: list | None = None) -> dict:
        messages = list(example.messages)
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            raise DataError("no assistant reply in the row")
        prefix, answer = self._prefix(messages[:-1]), str(messages[-1]["content"]).strip()
        if images is None:
            images = [open_image(value, example.root or Path.cwd()) for value in example.images]
        inputs = self._process(text=[prefix], images=[images] if images else None, suffix=[answer])
        return self._features(inputs, inputs["labels"][0].tolist())

    def conversation(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[str, list]:
        """The text the model sees, without the image tokens (`data show` decodes the real ids)."""
        if add_generation_prompt:
            return f"{self.bos}{self._prefix(messages)}\n", []
        prefix = f"{self.bos}{self._prefix(messages[:-1])}\n"
        reply = f"{str(messages[-1]['content']).strip()}{self.eos}"
        return prefix + reply, [(len(prefix), len(prefix) + len(reply))]

    @property
    def end_of_turn_ids(self) -> set[int]:
        return {self.tokenizer.eos_token_id}

    def prompt_inputs(self, prompts: list[tuple[list[dict], list]]):
        texts = [self._prefix(messages) for messages, _ in prompts]
        images = [images for _, images in prompts]
        return self._process(text=texts, images=images if any(images) else None, padding=True,
                             padding_side="left")


def image_token_id(processor) -> int | None:
    """The id that image features fill. Gemma 3's processor names its placeholder `<start_of_image>` as
    `image_token(_id)` while the features go to the tokenizer's `<image_soft_token>`, so the tokenizer's
    named image token wins where there is one."""
    tokenizer = getattr(processor, "tokenizer", processor)
    for owner in (tokenizer, processor):
        if getattr(owner, "image_token_id", None) is not None:
            return owner.image_token_id
    return tokenizer.convert_tokens_to_ids(getattr(processor, "image_token", IMAGE))


def _tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts a BOS in front of a text by itself (Llama, Mistral, Gemma do; Qwen does not)."""
    if tokenizer.bos_token_id is None:
        return False
    return tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [tokenizer.bos_token_id]


def _compiled(template: str):
    """The template as transformers compiles it (cached by transformers; its sandbox and extensions)."""
    return chat_template_utils._compile_jinja_template(template)


def _content_parts(content: str) -> list[dict]:
    """A string with `<image>` placeholders as chat-template parts. The newline LLaVA-style data puts right
    after a placeholder belongs to the placeholder: templates write their own separator after an image."""
    pieces = str(content).split(IMAGE)
    parts = []
    for i, piece in enumerate(pieces):
        if i:
            parts.append({"type": "image"})
            piece = piece.removeprefix("\n")
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
