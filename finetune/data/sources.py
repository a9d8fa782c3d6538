"""Read a user's rows: JSON, JSONL, CSV, Parquet, a saved HF dataset, a Hub dataset, an image folder.

Rows stay lazy: image columns hold paths (or undecoded HF image features) until a row is encoded.
JSON and JSONL are read with the standard library rather than `datasets`, because Arrow's schema
inference rejects the mixed rows real instruction data has (an `image` key in some rows only,
`answers` as a string here and a list there), and because we want `file:line` in every error.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from finetune.demo import is_synthetic, resolve_data
from finetune.errors import DataError

TABULAR = {".csv": "csv", ".parquet": "parquet"}


@dataclass
class BadRow:
    """A row that could not even be parsed; kept so the report can name it."""

    reason: str


class Rows(Sequence):
    """Rows of one data source, each a dict (or a BadRow), with `file:row` locations for messages.

    `items` is a sequence, or a function returning an iterator: then iterating reads the source one row at a
    time (a 1 GB JSON list is never held whole next to its parsed rows) and indexing reads it all first."""

    def __init__(self, name: str, base_dir: Path, items, first_row: int = 1, fingerprint=None):
        self.name = name
        self.base_dir = base_dir
        self._items = items
        self._first_row = first_row
        self._fingerprint = fingerprint

    def _sequence(self):
        if callable(self._items):
            self._items = list(self._items())
        return self._items

    def __len__(self) -> int:
        return len(self._sequence())

    def __getitem__(self, index: int):
        return self._sequence()[index]

    def __iter__(self):
        return iter(self._items() if callable(self._items) else self._items)

    def location(self, index: int) -> str:
        return f"{self.name}:{index + self._first_row}"

    def fingerprint(self) -> str:
        """A hash of the source's content (cache keys): the file's bytes, or the HF dataset's fingerprint."""
        if self._fingerprint is None:
            raise DataError(f"{self.name}: no content fingerprint for this source")
        return self._fingerprint()


def read_rows(spec: str, split: str = "train") -> Rows:
    """Open a data source named by a recipe's `data.train` / `data.eval`, every row read."""
    rows = open_rows(spec, split)
    rows._sequence()
    return rows


def open_rows(spec: str, split: str = "train") -> Rows:
    """Open a data source; JSON and JSON Lines rows are read as they are iterated (and parse errors raised then)."""
    if is_synthetic(spec):
        try:
            return open_rows(str(resolve_data(spec)), split)
        except ValueError as err:
            raise DataError(str(err)) from None
    path = Path(spec).expanduser()
    if path.is_file():
        return _read_file(path)
    if path.is_dir():
        return _read_folder(path, split)
    if path.suffix in (".json", ".jsonl", *TABULAR) or spec.startswith((".", "/", "~")):
        raise DataError(f"data file not found: {spec}")
    return _read_hub(spec, split)


def _read_file(path: Path) -> Rows:
    suffix = path.suffix.lower()
    fingerprint = partial(_file_fingerprint, path)
    if suffix in (".json", ".jsonl"):
        # By content as well as suffix: NLVR2 ships JSON Lines as .json, exporters write lists as .jsonl.
        first = _first_char(path)
        if first == "[":
            return Rows(str(path), path.parent, partial(_json_list, path), first_row=0, fingerprint=fingerprint)
        if suffix == ".jsonl" or (first == "{" and _several_values(path)):
            return Rows(str(path), path.parent, partial(_jsonl_rows, path), fingerprint=fingerprint)
        return _read_json(path)
    if suffix in TABULAR:
        from datasets import Dataset

        reader = Dataset.from_csv if suffix == ".csv" else Dataset.from_parquet
        try:
            dataset = reader(str(path))
        except Exception as err:  # noqa: BLE001 - pyarrow raises many types; the user needs file + reason
            raise DataError(f"{path}: cannot read {suffix[1:]}: {str(err).splitlines()[0]}") from None
        # CSV rows are numbered like the file's lines (header is line 1).
        return Rows(str(path), path.parent, _undecoded(dataset), first_row=2 if suffix == ".csv" else 0,
                    fingerprint=fingerprint)
    raise DataError(f"{path}: unsupported file type {suffix!r} (use .jsonl, .json, .csv or .parquet)")


def _file_fingerprint(path: Path) -> str:
    from finetune.data.check_cache import file_fingerprint

    return file_fingerprint(path)


# --- JSON and JSON Lines, streamed ------------------------------------------------------------------------------
# The standard library's decoder, one row at a time: Arrow's JSON reader rejects mixed rows (see above), ijson is
# one more dependency (and slow without its C backend), json.load would hold the whole file and all rows at once.
CHUNK = 1 << 20  # bytes read at a time
_SPACE = re.compile(r"\s*")


class _Stream:
    """A UTF-8 file decoded chunk by chunk, with a cursor, its line number and one-line errors."""

    def __init__(self, handle, path: Path):
        self.handle, self.path = handle, path
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")()  # -sig: Windows tools start files with a BOM
        self.text, self.pos, self.line, self.done_bytes, self.eof = "", 0, 1, 0, False

    def more(self) -> bool:
        """Read the next chunk (dropping what the cursor has passed); False at the end of the file."""
        if self.eof:
            return False
        chunk = self.handle.read(CHUNK)
        try:
            text = self.decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as err:
            raise _not_utf8(self.path, self.done_bytes + err.start, err.reason) from None
        self.done_bytes += len(chunk)
        self.eof = not chunk
        self.line += self.text.count("\n", 0, self.pos)
        self.text, self.pos = self.text[self.pos :] + text, 0
        return True

    def peek(self) -> str:
        """The next character that is not whitespace ("" at the end of the file)."""
        while True:
            self.pos = _SPACE.match(self.text, self.pos).end()
            if self.pos < len(self.text):
                return self.text[self.pos]
            if not self.more():
                return ""

    def value(self):
        """The next JSON value; values cut by the chunk's end are completed from the next chunk."""
        self.peek()
        while True:
            try:
                value, end = _DECODER.raw_decode(self.text, self.pos)
                # A number (or literal) at the very end of the chunk may continue in the next one.
                if end < len(self.text) or self.eof or isinstance(value, (dict, list, str)):
                    self.pos = end
                    return value
            except json.JSONDecodeError as err:
                if self.eof:
                    raise self.error(err.msg, err.pos) from None
            self.more()

    def error(self, message: str, pos: int | None = None) -> DataError:
        line = self.line + self.text.count("\n", 0, self.pos if pos is None else pos)
        return DataError(f"{self.path}:{line}: malformed JSON ({message})")


_DECODER = json.JSONDecoder()


def _json_list(path: Path):
    """The rows of a JSON list, one at a time."""
    with open(path, "rb") as handle:
        stream = _Stream(handle, path)
        stream.peek()
        stream.pos += 1  # the "["
        if stream.peek() == "]":
            stream.pos += 1
        else:
            while True:
                row = stream.value()
                yield row if isinstance(row, dict) else BadRow("a row must be a JSON object")
                after = stream.peek()
                stream.pos += 1
                if after == "]":
                    break
                if after != ",":
                    raise stream.error("Expecting ',' delimiter" if after else "Expecting value",
                                       stream.pos - 1)
        if stream.peek():
            raise stream.error("Extra data")


def _jsonl_rows(path: Path):
    """One row per line; a blank line is a BadRow unless only blank lines follow it."""
    blank = 0
    for line in _lines(path):
        if not line.strip():
            blank += 1
            continue
        for _ in range(blank):
            yield BadRow("empty line")
        blank = 0
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            yield BadRow(f"malformed JSON ({err.msg} at column {err.colno})")
            continue
        yield value if isinstance(value, dict) else BadRow("a row must be a JSON object")


def _lines(path: Path):
    with open(path, "rb") as handle:
        offset = 0
        for number, raw in enumerate(handle):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise _not_utf8(path, offset + err.start, err.reason) from None
            offset += len(raw)
            yield line.removeprefix("\ufeff") if number == 0 else line


def _not_utf8(path: Path, byte: int, reason: str) -> DataError:
    return DataError(f"{path}: not UTF-8 text (byte {byte}: {reason}); save it as UTF-8")


def _first_char(path: Path) -> str:
    with open(path, "rb") as handle:
        stream = _Stream(handle, path)
        return stream.peek()


def _several_values(path: Path) -> bool:
    """Whether a file starting with `{` holds more than one value: JSON Lines under a .json name."""
    with open(path, "rb") as handle:
        stream = _Stream(handle, path)
        try:
            stream.value()
        except DataError:
            return False  # malformed from the start: _read_json names the line
        return bool(stream.peek())


def _read_json(path: Path) -> Rows:
    """A file that is one JSON document but not a list: `{"data": [...]}`, or an error."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err.start, err.reason) from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON list of rows (or {{\"data\": [...]}})")
    rows = [row if isinstance(row, dict) else BadRow("a row must be a JSON object") for row in value]
    return Rows(str(path), path.parent, rows, first_row=0, fingerprint=partial(_file_fingerprint, path))


def _read_folder(path: Path, split: str) -> Rows:
    for meta in ("metadata.jsonl", "metadata.csv"):
        if (path / meta).is_file():
            # An image folder: metadata rows name their image in `file_name`, relative to the folder.
            rows = _read_file(path / meta)
            return Rows(rows.name, path, _ImageFolderRows(rows), rows._first_row, rows._fingerprint)
    if (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file():
        from datasets import DatasetDict, load_from_disk

        dataset = load_from_disk(str(path))
        if isinstance(dataset, DatasetDict):
            dataset = _pick_split(dataset, split, str(path))
        return Rows(str(path), path, _undecoded(dataset), first_row=0, fingerprint=lambda: dataset._fingerprint)
    raise DataError(f"{path}: a data folder needs metadata.jsonl (image folder) or a saved HF dataset")


class _ImageFolderRows(Sequence):
    def __init__(self, rows: Rows):
        self._rows = rows

    def __len__(self):
        return len(self._rows)

    def __getitem__(self, index):
        return _with_image(self._rows[index])

    def __iter__(self):
        return map(_with_image, self._rows)


def _with_image(row):
    if isinstance(row, dict) and "file_name" in row and "image" not in row:
        row = {**row, "image": row["file_name"]}
    return row


def _read_hub(name: str, split: str) -> Rows:
    from datasets import load_dataset

    try:
        dataset = load_dataset(name, split=split)
    except Exception as err:  # noqa: BLE001 - offline, typo, missing split: all one actionable line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(
            f"cannot load dataset {name!r} (not a local file or folder, and the Hub load failed: {first})"
        ) from None
    return Rows(f"{name}[{split}]", Path.cwd(), _undecoded(dataset), first_row=0,
                fingerprint=lambda: dataset._fingerprint)


def _undecoded(dataset):
    """Image columns as {"bytes", "path"} dicts: rows stay cheap to read, pixels are decoded only when a row is
    encoded (datasets would otherwise decode every image whenever a row is accessed)."""
    from datasets import Image, List

    for name, feature in dataset.features.items():
        if isinstance(feature, Image):
            dataset = dataset.cast_column(name, Image(decode=False))
        elif isinstance(feature, List) and isinstance(feature.feature, Image):
            dataset = dataset.cast_column(name, List(Image(decode=False)))
    return dataset


def _pick_split(dataset, split: str, name: str):
    if split in dataset:
        return dataset[split]
    raise DataError(f"{name}: no split {split!r}; it has {', '.join(dataset)}")
