"""What each task generates and how it is scored: a tiny table, one entry per task."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from finetune.metrics import caption_metrics, dialogue_metrics, vqa_accuracy_by_type


@dataclass(frozen=True)
class Task:
    name: str
    max_new_tokens: int
    headline: str  # the metric printed in before/after lines and used for best-checkpoint selection
    score: Callable[[list[str], list[list[str]], list], dict]


def _score_vqa(predictions, references, types) -> dict:
    result = vqa_accuracy_by_type(predictions, references, types if any(types) else None)
    metrics = {"vqa_accuracy": result["overall"]}
    metrics.update({f"vqa_accuracy/{k}": v for k, v in result.get("per_question_type", {}).items()})
    return metrics


def _score_caption(predictions, references, types) -> dict:
    return caption_metrics(predictions, references)


def _score_dialogue(predictions, references, types) -> dict:
    return dialogue_metrics(predictions, references)


TASKS = {
    "vqa": Task("vqa", max_new_tokens=16, headline="vqa_accuracy", score=_score_vqa),
    "caption": Task("caption", max_new_tokens=48, headline="CIDEr", score=_score_caption),
    "dialogue": Task("dialogue", max_new_tokens=96, headline="ROUGE-L", score=_score_dialogue),
}
