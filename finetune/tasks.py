"""What each task generates and how it is scored: a tiny table, one entry per task."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from finetune.metrics import (
    caption_metrics,
    cider_scores,
    dialogue_metrics,
    rouge_l_scores,
    vqa_accuracy,
    vqa_accuracy_by_type,
)

# The report's gallery counts an example as right when its per-example score reaches the task's `right_at`.
RIGHT_AT = 0.5  # VQA: at least 2 of 10 human answers agree (1 of 1); ROUGE-L; retrieval scores 1/0 (top-1 match)


@dataclass(frozen=True)
class Task:
    name: str
    max_new_tokens: int
    headline: str  # the metric printed in before/after lines and used for best-checkpoint selection
    score: Callable[[list[str], list[list[str]], list], dict]
    per_example: Callable[[list[str], list[list[str]]], list[float]] | None = None  # one score per example
    right_at: float = RIGHT_AT


def _score_vqa(predictions, references, types) -> dict:
    result = vqa_accuracy_by_type(predictions, references, types if any(types) else None)
    metrics = {"vqa_accuracy": result["overall"]}
    metrics.update({f"vqa_accuracy/{k}": v for k, v in result.get("per_question_type", {}).items()})
    return metrics


def _score_caption(predictions, references, types) -> dict:
    return caption_metrics(predictions, references)


def _score_dialogue(predictions, references, types) -> dict:
    return dialogue_metrics(predictions, references)


def _vqa_per_example(predictions, references) -> list[float]:
    return [vqa_accuracy(p, r) for p, r in zip(predictions, references)]


TASKS = {
    "vqa": Task("vqa", max_new_tokens=16, headline="vqa_accuracy", score=_score_vqa,
                per_example=_vqa_per_example),
    "caption": Task("caption", max_new_tokens=48, headline="CIDEr", score=_score_caption,
                    per_example=cider_scores, right_at=1.0),  # CIDEr-D per caption (x10 scale, can exceed 1)
    "dialogue": Task("dialogue", max_new_tokens=96, headline="ROUGE-L", score=_score_dialogue,
                     per_example=rouge_l_scores),
}
