"""From a data source to a training dataset: read rows, convert, check and measure every example once.

The up-front pass finds every unusable row before the first training step (a missing image costs
seconds here, not a crash at step 9,000) and records each example's exact token length, which
`group_by_length` and data.max_length need. It decodes no pixels where it can avoid it (finetune.data.measure:
image headers, the processor's token formula), spreads the work over data.num_proc processes, and caches what it
found (finetune.data.check_cache) so a second run or a resume starts at once.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from finetune.config import DataConfig
from finetune.data.checking import measure_examples
from finetune.data.encode import ChatEncoder
from finetune.data.formats import Example, row_to_examples
from finetune.data.measure import OK, TOO_LONG
from finetune.data.sources import BadRow, Rows, open_rows
from finetune.errors import DataError

log = logging.getLogger(__name__)
SHOWN_PROBLEMS = 20
TOO_LONG_SHARE = 0.01  # data.on_too_long=auto drops up to this share of the examples, and fails above it


@dataclass
class Report:
    source: str
    rows: int = 0
    examples: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)  # (file:row, reason)
    too_long: list[tuple[str, int]] = field(default_factory=list)  # (file:row, tokens) of rows over max_length

    def summary(self) -> str:
        lines = [f"{loc}: {reason}" for loc, reason in self.problems[:SHOWN_PROBLEMS]]
        if len(self.problems) > SHOWN_PROBLEMS:
            lines.append(f"... and {len(self.problems) - SHOWN_PROBLEMS} more")
        counts = Counter(_reason_kind(reason) for _, reason in self.problems)
        lines.append(
            f"{self.source}: {len(self.problems)} unusable row(s) of {self.rows}"
            + (" (" + ", ".join(f"{n} {kind}" for kind, n in counts.most_common()) + ")" if counts else "")
        )
        return "\n".join(lines)


class SupervisedDataset(torch.utils.data.Dataset):
    """Encodes one example per item, opening its images then (never all images in memory at once)."""

    def __init__(self, examples: list[Example], encoder: ChatEncoder, lengths: list[int]):
        self.examples = examples
        self.encoder = encoder
        self.lengths = lengths

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        return self.encoder.encode(self.examples[index])


def load_examples(spec: str, cfg: DataConfig, split: str) -> tuple[list[Example], Report]:
    """Every row converted to Examples (each placed: its `file:row` and image root), plus the rows that failed."""
    examples, report, _ = _load(spec, cfg, split)
    return examples, report


def _load(spec: str, cfg: DataConfig, split: str) -> tuple[list[Example], Report, Rows]:
    return convert_rows(spec, cfg, split,
                        lambda row: row_to_examples(row, cfg.format, cfg.columns, cfg.prompt, cfg.system_prompt))


def convert_rows(spec: str, cfg: DataConfig, split: str, convert) -> tuple[list, Report, Rows]:
    """Every row of a source converted by `convert(row) -> [examples]`, each placed (its `file:row` and image
    root); rows that cannot be read or converted go to the report."""
    rows = open_rows(spec, split)
    root = image_root(cfg, rows)
    report = Report(source=rows.name)
    examples = []
    for index, row in enumerate(rows):  # converted as read: the parsed row is dropped at once
        location = rows.location(index)
        report.rows += 1
        if isinstance(row, BadRow):
            report.problems.append((location, row.reason))
            continue
        try:
            converted = convert(row)
        except (DataError, KeyError, TypeError, ValueError) as err:
            report.problems.append((location, _one_line(err)))
            continue
        examples += [example.placed(location, root) for example in converted]
    return examples, report, rows


def check_examples(spec: str, cfg: DataConfig, encoder: ChatEncoder, split: str = "train",
                   progress: bool = True) -> tuple[list[Example], list[int], Report]:
    """Convert and measure every row once: the usable examples, their token lengths, and the report."""
    examples, report, rows = _load(spec, cfg, split)
    measured = measure_examples(examples, encoder, cfg, rows, report.source, split, progress)
    kept, lengths = [], []
    for example, (code, tokens, reason) in zip(examples, measured):
        if code == OK:
            kept.append(example)
            lengths.append(tokens)
        elif code == TOO_LONG:
            if cfg.on_too_long == "fail":
                raise DataError(f"{example.location}: {reason} (data.on_too_long=fail)")
            report.too_long.append((example.location, tokens))
        else:
            report.problems.append((example.location, reason))
    report.examples = len(kept)
    return kept, lengths, report


def build_dataset(spec: str, cfg: DataConfig, encoder: ChatEncoder, split: str = "train",
                  progress: bool = True) -> tuple[SupervisedDataset, Report]:
    """The training dataset; unusable rows fail the run (or are skipped), too-long rows are dropped."""
    kept, lengths, report = check_examples(spec, cfg, encoder, split, progress)
    if report.problems:
        if cfg.on_error == "fail":
            raise DataError(report.summary() + "\n(set data.on_error=skip to drop these rows)")
        log.warning("skipping unusable rows (data.on_error=skip):\n%s", report.summary())
    if report.too_long:
        _too_long(report, cfg, len(kept) + len(report.too_long))
    if not kept:
        raise DataError(f"{report.source}: no usable example left")
    return SupervisedDataset(kept, encoder, lengths), report


def _too_long(report: Report, cfg: DataConfig, total: int) -> None:
    """Say how many examples exceed data.max_length, the longest, and the key to change; fail when too many would go."""
    longest = max(length for _, length in report.too_long)
    shown = ", ".join(loc for loc, _ in report.too_long[:SHOWN_PROBLEMS])
    shown += " ..." if len(report.too_long) > SHOWN_PROBLEMS else ""
    share = len(report.too_long) / total
    summary = (f"{len(report.too_long)} of {total} examples ({share:.1%}) are longer than data.max_length="
               f"{cfg.max_length} (the longest has {longest} tokens): {shown}")
    if cfg.on_too_long == "auto" and share > TOO_LONG_SHARE:
        raise DataError(f"{summary}\nraise data.max_length (data.max_length={longest} fits them all), bound the "
                        "image tokens with model.processor options, or set data.on_too_long=drop to train without them")
    log.warning("dropped %s (data.max_length=%d fits them all)", summary, longest)


def image_root(cfg: DataConfig, rows: Rows) -> Path:
    """Where relative image paths point: data.image_root, else the data file's folder."""
    return Path(cfg.image_root).expanduser() if cfg.image_root else rows.base_dir


def _one_line(err: Exception) -> str:
    text = str(err).strip() or type(err).__name__
    if isinstance(err, KeyError):
        text = f"missing column {text}"
    return text.splitlines()[0]


def _reason_kind(reason: str) -> str:
    return reason.split(":")[0].split("(")[0].strip()
