"""Read a user's rows: JSON, JSONL, CSV, Parquet, a saved HF dataset, a Hub dataset, an image folder.

Rows stay lazy: image columns hold paths (or undecoded HF image features) until a row is encoded.
JSON and JSONL are read with the standard library rather than `datasets`, because Arrow's schema
inference rejects the mixed rows real instruction data has (an `image` key in some rows only,
`answers` as a string here and a list there), and because we want `file:line` in every error.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from finetune.demo import is_synthetic, resolve_data
from finetune.errors import DataError

TABULAR = {".csv": "csv", ".parquet": "parquet"}


@dataclass
class BadRow:
    """A row that could not even be parsed; kept so the report can name it."""

    reason: str


class Rows(Sequence):
    """Rows of one data source, each a dict (or a BadRow), with `file:row` locations for messages."""

    def __init__(self, name: str, base_dir: Path, items, first_row: int = 1):
        self.name = name
        self.base_dir = base_dir
        self._items = items
        self._first_row = first_row

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int):
        return self._items[index]

    def location(self, index: int) -> str:
        return f"{self.name}:{index + self._first_row}"


def read_rows(spec: str, split: str = "train") -> Rows:
    """Open a data source named by a recipe's `data.train` / `data.eval`."""
    if is_synthetic(spec):
        try:
            return read_rows(str(resolve_data(spec)), split)
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
    if suffix in (".json", ".jsonl"):
        try:
            # By content as well as suffix: NLVR2 ships JSON Lines as .json, exporters write lists as .jsonl.
            if suffix == ".jsonl" and not _starts_with(path, "["):
                with path.open(encoding="utf-8-sig") as lines:  # -sig: Windows tools start files with a BOM
                    return Rows(str(path), path.parent, _read_jsonl(lines))
            return _read_json(path)
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8") from None
    if suffix in TABULAR:
        from datasets import Dataset

        reader = Dataset.from_csv if suffix == ".csv" else Dataset.from_parquet
        try:
            dataset = reader(str(path))
        except Exception as err:  # noqa: BLE001 - pyarrow raises many types; the user needs file + reason
            raise DataError(f"{path}: cannot read {suffix[1:]}: {str(err).splitlines()[0]}") from None
        # CSV rows are numbered like the file's lines (header is line 1).
        return Rows(str(path), path.parent, _undecoded(dataset), first_row=2 if suffix == ".csv" else 0)
    raise DataError(f"{path}: unsupported file type {suffix!r} (use .jsonl, .json, .csv or .parquet)")


def _starts_with(path: Path, char: str) -> bool:
    with path.open(encoding="utf-8-sig") as handle:
        for line in handle:
            if line.strip():
                return line.lstrip().startswith(char)
    return False


def _read_jsonl(lines) -> list:
    items = []
    for line in lines:
        if not line.strip():
            items.append(BadRow("empty line"))
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            items.append(BadRow(f"malformed JSON ({err.msg} at column {err.colno})"))
            continue
        items.append(value if isinstance(value, dict) else BadRow("a row must be a JSON object"))
    # A trailing blank line is not a row.
    while items and isinstance(items[-1], BadRow) and items[-1].reason == "empty line":
        items.pop()
    return items


def _read_json(path: Path) -> Rows:
    text = path.read_text(encoding="utf-8-sig")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # one object per line: JSON Lines under another name
            return Rows(str(path), path.parent, _read_jsonl(text.splitlines()))
        raise DataError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON list of rows (or {{\"data\": [...]}})")
    rows = [row if isinstance(row, dict) else BadRow("a row must be a JSON object") for row in value]
    return Rows(str(path), path.parent, rows, first_row=0)


def _read_folder(path: Path, split: str) -> Rows:
    for meta in ("metadata.jsonl", "metadata.csv"):
        if (path / meta).is_file():
            # An image folder: metadata rows name their image in `file_name`, relative to the folder.
            rows = _read_file(path / meta)
            return Rows(rows.name, path, _ImageFolderRows(rows), rows._first_row)
    if (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file():
        from datasets import DatasetDict, load_from_disk

        dataset = load_from_disk(str(path))
        if isinstance(dataset, DatasetDict):
            dataset = _pick_split(dataset, split, str(path))
        return Rows(str(path), path, _undecoded(dataset), first_row=0)
    raise DataError(f"{path}: a data folder needs metadata.jsonl (image folder) or a saved HF dataset")


class _ImageFolderRows(Sequence):
    def __init__(self, rows: Rows):
        self._rows = rows

    def __len__(self):
        return len(self._rows)

    def __getitem__(self, index):
        row = self._rows[index]
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
    return Rows(f"{name}[{split}]", Path.cwd(), _undecoded(dataset), first_row=0)


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
