"""Image-text pairs for dual encoders (CLIP, SigLIP): rows -> PairExamples, the up-front check, a dataset that
gives each image one of its texts per epoch, and the collator.

Formats: `pairs` (an image and `caption` or `captions`; caption rows are pairs) and `classification` (an image and
`label`; the class name becomes text through `data.templates`). `data.format=auto` tells them apart by column.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from finetune.config import DataConfig
from finetune.data.dataset import Report, _one_line, convert_rows
from finetune.data.formats import _listify
from finetune.data.images import open_image
from finetune.errors import DataError

log = logging.getLogger(__name__)
PAIR_FORMATS = ("pairs", "classification")


@dataclass(frozen=True)
class PairExample:
    image: object  # a path, an undecoded HF image dict or bytes: opened when the example is used
    texts: tuple[str, ...]  # its captions, or its class name in every template
    label: str | None = None  # classification rows: the class name
    id: str | None = None
    location: str = ""
    root: Path | None = None

    def placed(self, location: str, root: Path) -> PairExample:
        return replace(self, location=location, root=root)


def row_to_pair(row: dict, fmt: str = "auto", columns: dict | None = None,
                templates: tuple[str, ...] = ("a photo of a {label}.",)) -> PairExample:
    """One image and its texts; raises DataError for a row that cannot be used."""
    if not isinstance(row, dict):
        raise DataError("a row must be a mapping of columns")
    if columns:
        row = {ours: row[theirs] for ours, theirs in columns.items() if theirs in row} | {
            k: v for k, v in row.items() if k not in columns.values()}
    if fmt == "auto":
        fmt = "classification" if "label" in row else "pairs" if "caption" in row or "captions" in row else None
    if fmt not in PAIR_FORMATS:
        raise DataError("cannot tell the row's format from its columns "
                        f"({', '.join(sorted(row)) or 'none'}); the retrieval task takes an image with "
                        "caption(s) (pairs) or with a label (classification)")
    images = row.get("image", row.get("images"))
    images = images if isinstance(images, (list, tuple)) else [images] if images not in (None, "") else []
    if len(images) != 1:
        raise DataError(f"a pair needs exactly one image, got {len(images)}")
    identity = None if row.get("id") is None else str(row["id"])
    if fmt == "classification":
        label = str(row.get("label", "")).strip()
        if not label:
            raise DataError("no label in the row")
        return PairExample(images[0], tuple(t.format(label=label) for t in templates), label, identity)
    captions = tuple(c for c in _listify(row.get("captions", row.get("caption"))) if c.strip())
    if not captions:
        raise DataError("no caption in the row")
    return PairExample(images[0], captions, None, identity)


def load_pairs(spec: str, cfg: DataConfig, split: str) -> tuple[list[PairExample], Report]:
    templates = tuple(cfg.templates)
    examples, report, _ = convert_rows(spec, cfg, split,
                                       lambda row: [row_to_pair(row, cfg.format, cfg.columns, templates)])
    return examples, report


def check_pairs(spec: str, cfg: DataConfig, split: str = "train",
                progress: bool = True) -> tuple[list[PairExample], Report]:
    """Every row read and its image opened once (a missing or broken image is named before the first step)."""
    examples, report = load_pairs(spec, cfg, split)
    kept = []
    for example in tqdm(examples, desc=f"checking {report.source}", disable=not progress, unit="ex", leave=False):
        try:
            open_image(example.image, example.root or Path.cwd())
            kept.append(example)
        except DataError as err:
            report.problems.append((example.location, _one_line(err)))
    report.examples = len(kept)
    return kept, report


def build_pairs(spec: str, cfg: DataConfig, split: str = "train", progress: bool = True):
    kept, report = check_pairs(spec, cfg, split, progress)
    if report.problems:
        if cfg.on_error == "fail":
            raise DataError(report.summary() + "\n(set data.on_error=skip to drop these rows)")
        log.warning("skipping unusable rows (data.on_error=skip):\n%s", report.summary())
    if not kept:
        raise DataError(f"{report.source}: no usable example left")
    return PairDataset(kept), report


class PairDataset(torch.utils.data.Dataset):
    """One item per image, with one of its texts: the next one each time the image comes round again, so the
    captions of an image are spread over epochs instead of meeting as false negatives in one batch."""

    def __init__(self, examples: list[PairExample]):
        self.examples = examples
        self.visits = [0] * len(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        example = self.examples[index]
        text = example.texts[self.visits[index] % len(example.texts)]
        self.visits[index] += 1
        return {"image": open_image(example.image, example.root or Path.cwd()), "text": text}


class PairCollator:
    """The processor on a batch of (image, text): texts padded to the length the text tower was trained with
    (SigLIP pools the last position, so its texts must be padded exactly as in pre-training) and truncated."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, items: list[dict]) -> dict:
        return dict(processor_batch(self.processor, [i["text"] for i in items], [i["image"] for i in items]))


def processor_batch(processor, texts: list[str] | None, images: list | None):
    tokenizer = getattr(processor, "tokenizer", processor)
    text_kwargs = {"padding": "max_length", "truncation": True, "max_length": _text_length(tokenizer)}
    if texts is None:
        return processor(images=images, return_tensors="pt")
    if images is None:
        return tokenizer(texts, return_tensors="pt", **text_kwargs)
    return processor(text=texts, images=images, return_tensors="pt", **text_kwargs)


def _text_length(tokenizer) -> int:
    """The text tower's length: the tokenizer's model_max_length (77 for CLIP, 64 for SigLIP)."""
    length = getattr(tokenizer, "model_max_length", None)
    return length if isinstance(length, int) and 0 < length < 100_000 else 77
