"""Test helper: the supervised parts of an encoded example."""

from finetune.data.encode import IGNORE


def supervised_runs(features: dict) -> list[list[int]]:
    """Each contiguous run of supervised tokens (labels equal to their input ids, which the helper checks)."""
    runs, current = [], []
    for token, label in zip(features["input_ids"], features["labels"]):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])
