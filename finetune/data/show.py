"""`finetune data show`: the first examples exactly as the model sees them, supervised tokens highlighted.

Each example goes through the training encoder (chat template, processor, labels, data.max_length), and the
result is decoded back with special tokens kept. A run of N image tokens is written `TOKEN×N` (e.g.
`<image>×576`), in the terminal view and in `--json`'s `text` alike, so one example fits on a screen.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

from finetune.config import load_recipe
from finetune.data.dataset import _one_line, image_root
from finetune.data.encode import IGNORE, image_token_id, make_encoder
from finetune.data.formats import Example, row_to_examples
from finetune.data.sources import BadRow, read_rows
from finetune.errors import ConfigError, DataError
from finetune.models import load_processor

TIMES = "\u00d7"  # the multiplication sign of `<image>×576`
MARK = ("[[", "]]")  # supervised span markers when the output is not a terminal
GREEN, CYAN, BOLD, RESET = "\033[1;32m", "\033[36m", "\033[1m", "\033[0m"


@dataclass(frozen=True)
class Piece:
    """A run of consecutive tokens of one kind, decoded (an image run as `TOKEN×N`)."""

    text: str
    supervised: bool  # labels != -100: the tokens are in the loss
    image: bool


@dataclass(frozen=True)
class Shown:
    row: str  # file:row
    pieces: tuple[Piece, ...]
    tokens: int  # len(input_ids), after data.max_length
    image_tokens: int

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.pieces)

    @property
    def supervised(self) -> list[str]:
        """Each maximal run of supervised tokens, decoded."""
        spans, previous = [], False
        for piece in self.pieces:
            if piece.supervised:
                if previous:
                    spans[-1] += piece.text
                else:
                    spans.append(piece.text)
            previous = piece.supervised
        return spans

    def to_json(self) -> dict:
        return {"row": self.row, "text": self.text, "supervised": self.supervised, "tokens": self.tokens,
                "image_tokens": self.image_tokens}


@dataclass(frozen=True)
class Unusable:
    row: str  # file:row
    reason: str


def show_examples(processor, examples: Iterable[Example | Unusable], max_length: int) -> Iterator[Shown | Unusable]:
    """Each example as training encodes it; one that cannot be encoded becomes Unusable (as do those given)."""
    encoder = make_encoder(processor, max_length)
    image_id = image_token_id(processor)
    for example in examples:
        if isinstance(example, Unusable):
            yield example
            continue
        try:
            features = encoder.encode(example)
        except DataError as err:
            yield Unusable(example.location, _one_line(err))
            continue
        ids, labels = features["input_ids"], features["labels"]
        yield Shown(example.location, _pieces(encoder.tokenizer, ids, labels, image_id), len(ids),
                    sum(t == image_id for t in ids))


def _pieces(tokenizer, ids: list[int], labels: list[int], image_id: int | None) -> tuple[Piece, ...]:
    runs = []  # (start, end, supervised, image)
    for i, (token, label) in enumerate(zip(ids, labels)):
        kind = (label != IGNORE, token == image_id)
        if runs and tuple(runs[-1][2:]) == kind:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1, *kind])
    image_text = tokenizer.convert_ids_to_tokens(image_id) if image_id is not None else ""
    pieces, done = [], ""
    for start, end, supervised, image in runs:
        # Decode growing prefixes and keep the new text: a run decoded alone loses the space a
        # SentencePiece token carries when it follows other tokens.
        through = tokenizer.decode(ids[:end], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if through.startswith(done):
            text = through[len(done):]
        else:  # a multi-byte character split across two runs
            text = tokenizer.decode(ids[start:end], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        done = through
        pieces.append(Piece(f"{image_text}{TIMES}{end - start}" if image else text, supervised, image))
    return tuple(pieces)


# --- reading the first rows ----------------------------------------------------------------------------------
def first_examples(spec: str, cfg, split: str) -> Iterator[Example | Unusable]:
    """Rows converted one at a time, in file order, so showing three rows does not convert a million
    (load_examples converts every row up front, as training needs)."""
    rows = read_rows(spec, split)
    root = image_root(cfg, rows)
    for index in range(len(rows)):
        row, location = rows[index], rows.location(index)
        if isinstance(row, BadRow):
            yield Unusable(location, row.reason)
            continue
        try:
            converted = row_to_examples(row, cfg.format, cfg.columns, cfg.prompt, cfg.system_prompt)
        except DataError as err:
            yield Unusable(location, _one_line(err))
            continue
        yield from (example.placed(location, root) for example in converted)


# --- printing ---------------------------------------------------------------------------------------------------
def format_text(shown: Shown, color: bool) -> str:
    """The terminal view: a header line, then the decoded input with supervised spans in green (or [[...]])."""
    header = f"--- {shown.row}: {shown.tokens} tokens, {shown.image_tokens} image tokens"
    flags = [p.supervised for p in shown.pieces]
    body = []
    for i, piece in enumerate(shown.pieces):
        if color:
            style = GREEN if piece.supervised else CYAN if piece.image else ""
            body.append(f"{style}{piece.text}{RESET}" if style else piece.text)
        else:  # markers around each whole supervised span, however many pieces it has
            opens = piece.supervised and (i == 0 or not flags[i - 1])
            closes = piece.supervised and (i + 1 == len(flags) or not flags[i + 1])
            body.append(MARK[0] * opens + piece.text + MARK[1] * closes)
    body = "".join(body)
    # Every example ends with a line break of its own, so a blank line separates it from the next header.
    return (f"{BOLD}{header}{RESET}" if color else header) + "\n" + body + ("" if body.endswith("\n") else "\n")


def show_data(recipe, overrides=None, rows: int = 3, as_json: bool = False, color: bool | None = None,
              out=None, err=None) -> bool:
    """Print the first `rows` examples of data.train (else data.eval); a row that cannot be used is printed as
    `file:row: reason` on `err`. True when every row shown was usable. `color=None`: when `out` is a terminal."""
    out, err = out or sys.stdout, err or sys.stderr
    if rows < 1:
        raise ConfigError(f"--rows must be at least 1, got {rows}")
    recipe = load_recipe(recipe, overrides)
    cfg = recipe.data
    spec, split = (cfg.train, cfg.split) if cfg.train else (cfg.eval, cfg.eval_split or "validation")
    if not spec:
        raise ConfigError("nothing to show: set data.train or data.eval")
    if color is None:
        color = out.isatty() and not os.environ.get("NO_COLOR")
    # Only the processor is needed (tokenizer, chat template, image processor): no model weights load.
    processor = load_processor(recipe.model)
    items = show_examples(processor, islice(first_examples(spec, cfg, split), rows), cfg.max_length)
    ok = True
    if not as_json:
        legend = (f"{GREEN}green{RESET}" if color else "[[...]]") + " = supervised (in the loss); "
        print(f"{legend}TOKEN{TIMES}N = N image tokens", file=out)
    for item in items:
        if isinstance(item, Unusable):
            ok = False
            out.flush()
            print(f"{item.row}: {item.reason}", file=err)
        elif as_json:
            print(json.dumps(item.to_json(), ensure_ascii=False), file=out)
        else:
            print(format_text(item, color), file=out)
    return ok
