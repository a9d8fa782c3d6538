"""Batches of encoded rows: token lists right-padded (or packed several to a row), image tensors concatenated."""

from __future__ import annotations

import torch

from finetune.data.encode import IGNORE


class Collator:
    """Right-pads token lists into a batch and concatenates the image tensors of the rows that have images.

    `packing` ("rows" or "flat", see finetune.data.packing) packs the examples instead: each row holds one or more
    whole examples end to end, `position_ids` restart at 0 for each, and there is no `attention_mask`, from which
    transformers keeps each example from attending to another. A row's padding continues its last example's
    positions, so a batch whose rows hold one example each needs no mask at all. Image tensors follow the examples'
    order in the packed rows, which is the order their image tokens appear in, so every image lands on its own tokens.
    """

    def __init__(self, pad_token_id: int, packing: str | None = None):
        if packing not in (None, "rows", "flat"):
            raise ValueError(f"packing must be None, 'rows' or 'flat', not {packing!r}")
        self.pad_token_id = pad_token_id
        self.packing = packing

    def __call__(self, features: list[dict]) -> dict:
        if self.packing:
            return self.pack(features)
        length = max(len(f["input_ids"]) for f in features)
        batch = {}
        keys = dict.fromkeys(k for f in features for k in f)  # text-only rows have no pixel_values
        for key in keys:
            present = [f[key] for f in features if key in f]
            if isinstance(present[0], list):
                pad = self._pad_value(key)
                # A per-token key only some rows carry (token_type_ids of image rows) is zeros for the others,
                # so every row keeps its own place in the batch.
                values = [f.get(key, [0] * len(f["input_ids"])) for f in features]
                batch[key] = torch.tensor([v + [pad] * (length - len(v)) for v in values])
            else:
                batch[key] = _concat(present)
        if "attention_mask" not in batch:
            batch["attention_mask"] = (torch.arange(length)[None] < torch.tensor(
                [len(f["input_ids"]) for f in features])[:, None]).long()
        return batch

    def _pad_value(self, key: str) -> int:
        return IGNORE if key == "labels" else self.pad_token_id if key == "input_ids" else 0

    def pack(self, features: list[dict]) -> dict:
        rows = [features] if self.packing == "flat" else first_fit(features)
        width = max(sum(len(f["input_ids"]) for f in row) for row in rows)
        ordered = [f for row in rows for f in row]
        keys = [k for k in dict.fromkeys(k for f in features for k in f) if k != "attention_mask"]
        token_keys = [k for k in keys if isinstance(next(f[k] for f in features if k in f), list)]
        columns = {key: [] for key in [*token_keys, "position_ids"]}
        for row in rows:
            line = {key: [] for key in columns}
            for f in row:
                n = len(f["input_ids"])
                for key in token_keys:
                    line[key] += f.get(key, [0] * n)
                # The first token of an example is never a target: the previous example's last token precedes it.
                if "labels" in line:
                    line["labels"][len(line["labels"]) - n] = IGNORE
                line["position_ids"] += range(n)
            tail = width - len(line["input_ids"])
            for key in token_keys:
                line[key] += [self._pad_value(key)] * tail
            # Padding continues the row's last example: it comes after every real token, so causal attention keeps
            # it out of their view, and it is outside the loss. A row of one example is then not a packed row,
            # and when no row is, transformers needs no mask at all (sdpa runs causal and skips the masked half).
            line["position_ids"] += range(n, n + tail)
            for key, values in line.items():
                columns[key].append(values)
        batch = {key: torch.tensor(values) for key, values in columns.items()}
        for key in keys:
            if key not in token_keys:
                batch[key] = _concat([f[key] for f in ordered if key in f])
        # Without this, the decoder makes a KV cache in train mode, and transformers then skips the packed-sequence
        # mask (it only looks for packing when there is no cache): examples would attend to each other.
        batch["use_cache"] = False
        return batch


def first_fit(features: list[dict]) -> list[list[dict]]:
    """First-fit decreasing: rows no longer than the longest example, as few as that allows."""
    capacity = max(len(f["input_ids"]) for f in features)
    rows, room = [], []
    for f in sorted(features, key=lambda f: -len(f["input_ids"])):
        n = len(f["input_ids"])
        for i, free in enumerate(room):
            if n <= free:
                rows[i].append(f)
                room[i] -= n
                break
        else:
            rows.append([f])
            room.append(capacity - n)
    return rows


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
