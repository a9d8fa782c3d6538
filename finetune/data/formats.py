"""Turn a row of any supported format into canonical Examples: images + chat messages."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from finetune.errors import DataError
from finetune.tasks import TASKS

IMAGE = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
         "developer": "system"}  # OpenAI's newer name for the system message
SYSTEM_COLUMNS = ("system", "system_prompt")  # a row-level system prompt (LLaMA-Factory, lmms-finetune)
# Content-part types, as OpenAI chat/Responses, Hugging Face chat templates and LLaMA-Factory v1 write them.
TEXT_PARTS = ("text", "input_text", "output_text")
IMAGE_PARTS = ("image", "image_url", "input_image")


@dataclass(frozen=True, slots=True)  # slots: a 665k-row dataset holds 665k of these
class Example:
    """One conversation as every later stage sees it; built once per row and never changed afterwards.

    Each message is `{"role", "content"}` with content a string holding one `<image>` placeholder per
    entry of `images`, in order. Image values stay unopened (paths, undecoded HF image dicts, bytes).
    """

    messages: tuple[dict, ...]
    images: tuple = ()
    references: tuple[str, ...] = ()  # what evaluation compares with (all VQA answers, all captions)
    id: str | None = None
    question_type: str | None = None
    location: str = ""  # file:row, for messages that name the row
    root: Path | None = None  # where relative image paths point

    def placed(self, location: str, root: Path) -> Example:
        return replace(self, location=location, root=root)


def detect_format(row: dict) -> str:
    if "conversations" in row:
        return "llava"
    if "messages" in row:
        return "messages"
    if "question" in row and ("answer" in row or "answers" in row):
        return "vqa"
    if "caption" in row or "captions" in row:
        return "caption"
    raise DataError(
        "cannot tell the row's format from its columns "
        f"({', '.join(sorted(row)) or 'none'}); expected conversations, messages, question+answer(s) "
        "or caption(s) (rename columns with data.columns, or set data.format)"
    )


def row_to_examples(row: dict, fmt: str = "auto", columns: dict | None = None, prompt: str | None = None,
                    system_prompt: str | None = None) -> list[Example]:
    """Canonical Examples of one row (a caption row with several captions gives one per caption).

    Raises DataError, and only DataError, for any row it cannot use.
    """
    try:
        return _row_to_examples(row, fmt, columns, prompt, system_prompt)
    except DataError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as err:  # a shape no check above foresaw
        detail = f"missing {err}" if isinstance(err, KeyError) else str(err).splitlines()[0] if str(err) else ""
        raise DataError(f"malformed row ({type(err).__name__}{': ' + detail if detail else ''})") from None


def _row_to_examples(row, fmt, columns, prompt, system_prompt) -> list[Example]:
    if not isinstance(row, dict):
        raise DataError("a row must be a mapping of columns")
    if columns:
        row = {ours: row[theirs] for ours, theirs in columns.items() if theirs in row} | {
            k: v for k, v in row.items() if k not in columns.values()
        }
    fmt = detect_format(row) if fmt == "auto" else fmt
    convert = {"llava": _from_llava, "messages": _from_messages, "vqa": _from_vqa, "caption": _from_caption}[fmt]
    # A system turn in the conversation wins over the row's system column, which wins over data.system_prompt.
    system = _row_system(row) or system_prompt
    examples = []
    for messages, images, extra in convert(row, prompt):
        if system and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": system})
        example = Example(messages=tuple(messages), images=tuple(images), id=_text_or_none(row.get("id")), **extra)
        check_example(example)
        examples.append(example)
    return examples


def _text_or_none(value) -> str | None:
    return None if value is None else str(value)


def _row_system(row: dict) -> str | None:
    for column in SYSTEM_COLUMNS:
        value = row.get(column)
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        if not isinstance(value, str):
            raise DataError(f"`{column}` must be text, got {type(value).__name__}")
        return value
    return None


def _first(mapping: dict, *keys):
    """The first of `keys` with a value: Arrow gives every part struct all keys, the missing ones as None."""
    return next((mapping[k] for k in keys if mapping.get(k) is not None), None)


def check_example(example: Example) -> None:
    replies = [m for m in example.messages if m["role"] == "assistant"]
    if not replies:
        raise DataError("no assistant reply in the row")
    if any(not str(m["content"]).strip() for m in replies):
        raise DataError("an assistant reply is empty")
    placeholders = sum(str(m["content"]).count(IMAGE) for m in example.messages)
    if placeholders != len(example.images):
        raise DataError(f"{placeholders} {IMAGE} placeholder(s) but {len(example.images)} image(s)")


def _images(value) -> list:
    if value is None or value == "":
        return []
    if isinstance(value, str) and value.startswith("["):  # a list written as JSON text (CSV cells)
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _from_llava(row: dict, prompt: str | None) -> list[tuple]:
    return _from_turns(row.get("conversations"), "conversations", row.get("image", row.get("images")))


def _from_messages(row: dict, prompt: str | None) -> list[tuple]:
    return _from_turns(row.get("messages"), "messages", row.get("images", row.get("image")))


def _from_turns(turns, column: str, images) -> list[tuple]:
    """ShareGPT/LLaVA `{from, value}` and OpenAI/HF `{role, content}` turns alike; content is text or parts."""
    if isinstance(turns, str):
        turns = json.loads(turns)
    if not isinstance(turns, list):
        raise DataError(f"`{column}` must be a list of {{role, content}} or {{from, value}} turns")
    images = _images(images)
    inline = []
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise DataError(f"each turn of `{column}` must be a mapping with role/from and content/value")
        speaker = _first(turn, "role", "from")
        if speaker is None or not ("content" in turn or "value" in turn):
            raise DataError(f"each turn of `{column}` needs role/from and content/value")
        role = ROLES.get(str(speaker).lower())
        if role is None:
            raise DataError(f"unknown role {speaker!r} (use system, user/human or assistant/gpt)")
        content = _first(turn, "content", "value")  # None: an OpenAI tool-call turn, or Arrow's missing key
        if isinstance(content, list):
            content, found = _parts_to_text(content)
            inline += found
        elif isinstance(content, dict):
            raise DataError("a turn's content must be text or a list of content parts")
        messages.append({"role": role, "content": "" if content is None else str(content)})
    if inline and images:
        raise DataError("images given both inside the message parts and in `images`; use one of the two")
    images = inline or images
    _add_missing_placeholders(messages, images)
    return [(messages, images, {})]


def _parts_to_text(parts: list) -> tuple[str, list]:
    """Content parts -> text with one placeholder per image part, plus the images the parts carry.

    Image parts may hold their image (HF `image`/`path`/`url`, OpenAI `image_url.url` or a bare `image_url`
    string, LLaMA-Factory v1 `value`) or leave it to the row's `images` column.
    """
    text, images = [], []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in TEXT_PARTS:
            value = _first(part, "text", "value")
            if isinstance(value, (dict, list)):
                raise DataError(f"the text of a {kind!r} part must be a string")
            text.append("" if value is None else str(value))
        elif kind in IMAGE_PARTS:
            text.append(IMAGE)
            value = _image_in_part(part, kind)
            if value is not None:
                images.append(value)
        elif kind is None:
            raise DataError("a content part must be a mapping with a `type`")
        else:
            raise DataError(f"unsupported content part type {str(kind)!r} (use text, image or image_url)")
    return "".join(text), images


def _image_in_part(part: dict, kind: str):
    for key in (kind, "image", "image_url", "path", "url", "value"):
        value = part.get(key)
        if isinstance(value, dict) and "url" in value:  # OpenAI: {"url": ..., "detail": ...}
            value = value["url"]
        if value is not None:
            return value
    return None


def _add_missing_placeholders(messages: list[dict], images: list) -> None:
    """LLaVA convention: images with no placeholder anywhere go before the first user turn's text."""
    if images and not any(IMAGE in m["content"] for m in messages):
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is not None:
            first_user["content"] = (IMAGE + "\n") * len(images) + first_user["content"]


def _listify(value) -> list[str]:
    if isinstance(value, str) and value.startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    if isinstance(value, (list, tuple)):
        return [str(v.get("answer", v)) if isinstance(v, dict) else str(v) for v in value]
    return [] if value is None else [str(value)]


def _from_vqa(row: dict, prompt: str | None) -> list[tuple]:
    answers = _listify(row.get("answers", row.get("answer")))
    if not answers or not any(a.strip() for a in answers):
        raise DataError("no answer in the row")
    # Train on the most common human answer (ties: first seen), score against all of them.
    target = Counter(a for a in answers if a.strip()).most_common(1)[0][0]
    images = _images(row.get("image"))
    question = str(row.get("question", "")).strip()
    if not question:
        raise DataError("empty question")
    user = IMAGE * len(images) + ("\n" if images else "") + (prompt.format(question=question) if prompt else question)
    extra = {"references": tuple(answers), "question_type": row.get("question_type")}
    return [([{"role": "user", "content": user}, {"role": "assistant", "content": target}], images, extra)]


def _from_caption(row: dict, prompt: str | None) -> list[tuple]:
    captions = [c for c in _listify(row.get("captions", row.get("caption"))) if c.strip()]
    if not captions:
        raise DataError("no caption in the row")
    images = _images(row.get("image"))
    user = IMAGE * len(images) + ("\n" if images else "") + (prompt or TASKS["caption"].prompt)
    return [([{"role": "user", "content": user}, {"role": "assistant", "content": c}], images,
             {"references": tuple(captions)}) for c in captions]
