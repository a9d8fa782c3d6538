"""Batches of examples of similar length, from the lengths the data check measured (nothing is encoded again)."""

from __future__ import annotations

import torch

MEGA_BATCHES = 50  # batches sorted together: transformers' largest mega-batch


class LengthGroupedSampler(torch.utils.data.Sampler):
    """Indices in batches of neighbours in length: random mega-batches of 50 batches (the whole set when smaller)
    are each sorted by length and cut into batches; the epoch's batches come in random order, the one with the
    longest example first (an out-of-memory error shows at step 1), a short last batch last.

    Hand-written because transformers' sampler fixes its sizes inside get_length_grouped_indices: it makes at
    least four mega-batches (on 256 mixed-length examples, batches of 8 are then ~9% padding; here ~3%) and
    emits each one longest to shortest. The order is drawn from `seed` + the epoch (Trainer calls set_epoch), not
    from torch's global generator as there: every process draws the same order, and a run resumed from a
    checkpoint trains on the batches the uninterrupted run would have.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0, mega_batches: int = MEGA_BATCHES):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.mega_batches = mega_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        return iter(i for batch in self.batches() for i in batch)

    def batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        indices = torch.randperm(len(self.lengths), generator=generator).tolist()
        size = self.mega_batches * self.batch_size
        batches = []
        for start in range(0, len(indices), size):
            mega = sorted(indices[start : start + size], key=lambda i: -self.lengths[i])
            batches += [mega[i : i + self.batch_size] for i in range(0, len(mega), self.batch_size)]
        short = [batches.pop()] if batches and len(batches[-1]) < self.batch_size else []
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        if batches:
            longest = max(range(len(batches)), key=lambda b: self.lengths[batches[b][0]])
            batches[0], batches[longest] = batches[longest], batches[0]
        return batches + short
