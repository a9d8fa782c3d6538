"""Turn a row of any supported format into canonical Examples: images + chat messages.

An Example is `{"images": [...], "messages": [{"role", "content"}], "meta": {...}}` where content is
a string with one `<image>` placeholder per image, in order; `meta` carries the id, the references
(VQA answers, captions) and the question type for evaluation.
"""

from __future__ import annotations

import json
from collections import Counter

from finetune.errors import DataError

IMAGE = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
TASK_PROMPTS = {"caption": "Describe the image briefly."}


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
                    system_prompt: str | None = None) -> list[dict]:
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


def _row_to_examples(row, fmt, columns, prompt, system_prompt) -> list[dict]:
    if not isinstance(row, dict):
        raise DataError("a row must be a mapping of columns")
    if columns:
        row = {ours: row[theirs] for ours, theirs in columns.items() if theirs in row} | {
            k: v for k, v in row.items() if k not in columns.values()
        }
    fmt = detect_format(row) if fmt == "auto" else fmt
    examples = {"llava": _from_llava, "messages": _from_messages, "vqa": _from_vqa, "caption": _from_caption}[
        fmt
    ](row, prompt)
    for example in examples:
        example["meta"].setdefault("id", row.get("id"))
        if system_prompt and example["messages"][0]["role"] != "system":
            example["messages"].insert(0, {"role": "system", "content": system_prompt})
        check_example(example)
    return examples


def check_example(example: dict) -> None:
    messages = example["messages"]
    replies = [m for m in messages if m["role"] == "assistant"]
    if not replies:
        raise DataError("no assistant reply in the row")
    if any(not str(m["content"]).strip() for m in replies):
        raise DataError("an assistant reply is empty")
    placeholders = sum(str(m["content"]).count(IMAGE) for m in messages)
    if placeholders != len(example["images"]):
        raise DataError(f"{placeholders} {IMAGE} placeholder(s) but {len(example['images'])} image(s)")


def _images(value) -> list:
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _from_llava(row: dict, prompt: str | None) -> list[dict]:
    turns = row.get("conversations")
    if isinstance(turns, str):
        turns = json.loads(turns)
    if not isinstance(turns, list):
        raise DataError("`conversations` must be a list of {from, value} turns")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict) or "value" not in turn:
            raise DataError("each turn of `conversations` needs `from` and `value`")
        role = ROLES.get(str(turn.get("from", "")).lower())
        if role is None:
            raise DataError(f"unknown speaker {turn.get('from')!r} (use human/gpt, user/assistant or system)")
        messages.append({"role": role, "content": str(turn["value"])})
    images = _images(row.get("image", row.get("images")))
    _add_missing_placeholders(messages, images)
    return [{"images": images, "messages": messages, "meta": {}}]


def _from_messages(row: dict, prompt: str | None) -> list[dict]:
    raw = row.get("messages")
    if isinstance(raw, str):
        raw = json.loads(raw)
    if not isinstance(raw, list):
        raise DataError("`messages` must be a list of {role, content}")
    images = _images(row.get("images", row.get("image")))
    inline = []
    messages = []
    for message in raw:
        if not isinstance(message, dict) or "role" not in message:
            raise DataError("each message needs `role` and `content`")
        role = ROLES.get(str(message["role"]).lower())
        if role is None:
            raise DataError(f"unknown role {message['role']!r} (use system, user or assistant)")
        content = message.get("content")
        if isinstance(content, list):
            content, found = _parts_to_text(content)
            inline += found
        messages.append({"role": role, "content": "" if content is None else str(content)})
    if inline and images:
        raise DataError("images given both inside the message parts and in `images`; use one of the two")
    images = inline or images
    _add_missing_placeholders(messages, images)
    return [{"images": images, "messages": messages, "meta": {}}]


def _parts_to_text(parts: list) -> tuple[str, list]:
    """OpenAI/HF style content parts -> text with placeholders, plus any images the parts carry."""
    text, images = [], []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            text.append(str(part.get("text", "")))
        elif kind == "image":
            text.append(IMAGE)
            value = part.get("image", part.get("path", part.get("url")))
            if value is not None:
                images.append(value)
        else:
            raise DataError(f"unsupported content part {part!r} (use type text or image)")
    return "".join(text), images


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


def _from_vqa(row: dict, prompt: str | None) -> list[dict]:
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
    meta = {"references": answers, "question_type": row.get("question_type")}
    return [{"images": images, "messages": [{"role": "user", "content": user},
                                             {"role": "assistant", "content": target}], "meta": meta}]


def _from_caption(row: dict, prompt: str | None) -> list[dict]:
    captions = [c for c in _listify(row.get("captions", row.get("caption"))) if c.strip()]
    if not captions:
        raise DataError("no caption in the row")
    images = _images(row.get("image"))
    user = IMAGE * len(images) + ("\n" if images else "") + (prompt or TASK_PROMPTS["caption"])
    return [
        {"images": images, "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": c}],
         "meta": {"references": captions}}
        for c in captions
    ]
