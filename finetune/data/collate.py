"""Batches of encoded rows: token lists right-padded, image tensors concatenated."""

from __future__ import annotations

import torch

from finetune.data.encode import IGNORE


class Collator:
    """Right-pads token lists into a batch and concatenates the image tensors of the rows that have images."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict:
        length = max(len(f["input_ids"]) for f in features)
        batch = {}
        keys = dict.fromkeys(k for f in features for k in f)  # text-only rows have no pixel_values
        for key in keys:
            present = [f[key] for f in features if key in f]
            if isinstance(present[0], list):
                pad = IGNORE if key == "labels" else self.pad_token_id if key == "input_ids" else 0
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
