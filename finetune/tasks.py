"""Everything the toolkit knows about a task, in one table: prompts, generation length, scoring, Hub metadata.

Adding a task is one entry here plus its scoring function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# The report's gallery counts an example as right when its per-example score reaches the task's `right_at`.
RIGHT_AT = 0.5  # VQA: at least 2 of 10 human answers agree (1 of 1); ROUGE-L; retrieval scores 1/0 (top-1 match)


@dataclass(frozen=True)
class Task:
    name: str
    max_new_tokens: int  # generation budget in evaluation
    headline: str  # the metric printed in before/after lines and used for best-checkpoint selection
    # (predictions, references, question types) -> (metrics, one score per prediction for the report)
    score: Callable[[list[str], list[list[str]], list], tuple[dict, list[float]]]
    eval_task_type: str  # model-index task type on the model card
    example_prompt: str  # the model card's usage snippet asks this
    pipeline_tag: str = "image-text-to-text"  # the Hub's pipeline tag for the model card
    prompt: str | None = None  # the instruction for rows that carry none (caption rows)
    right_at: float = RIGHT_AT  # per-example score from which the report counts an answer as right
    # generative: a vision-language model answers (generation, chat templates); contrastive: a dual encoder
    # (CLIP, SigLIP) embeds images and texts (finetune.retrieval scores it, `score` is unused)
    kind: str = "generative"
    also_headline: str | None = None  # the headline when eval data gives no `headline` (retrieval: labelled images)

    def headline_in(self, metrics: dict) -> str:
        """The metric to print and select checkpoints by, among those this evaluation produced."""
        return self.headline if self.headline in metrics or not self.also_headline else self.also_headline


def _score_vqa(predictions, references, types):
    from finetune.metrics import vqa_accuracy, vqa_accuracy_by_type

    result = vqa_accuracy_by_type(predictions, references, types if any(types) else None)
    metrics = {"vqa_accuracy": result["overall"]}
    metrics.update({f"vqa_accuracy/{k}": v for k, v in result.get("per_question_type", {}).items()})
    return metrics, [vqa_accuracy(p, r) for p, r in zip(predictions, references)]


def _score_caption(predictions, references, types):
    from finetune.metrics import caption_metrics_with_scores

    return caption_metrics_with_scores(predictions, references)


def _score_dialogue(predictions, references, types):
    from finetune.metrics import rouge_l_with_scores

    mean, each = rouge_l_with_scores(predictions, references)
    return {"ROUGE-L": mean}, each


def _score_by_embedding(predictions, references, types):
    raise TypeError("a contrastive task is scored on embeddings: finetune.retrieval.score_pairs")


TASKS = {
    "vqa": Task("vqa", max_new_tokens=16, headline="vqa_accuracy", score=_score_vqa,
                eval_task_type="visual-question-answering", example_prompt="What is in the image?"),
    "caption": Task("caption", max_new_tokens=48, headline="CIDEr", score=_score_caption,
                    eval_task_type="image-to-text", example_prompt="Describe the image.",
                    prompt="Describe the image briefly.", right_at=1.0),  # CIDEr-D per caption (can exceed 1)
    "dialogue": Task("dialogue", max_new_tokens=96, headline="ROUGE-L", score=_score_dialogue,
                     eval_task_type="image-text-to-text", example_prompt="Tell me about this image."),
    # Image-text retrieval and zero-shot classification with a dual encoder: mean_recall on caption pairs,
    # zeroshot_top1 on labelled images.
    "retrieval": Task("retrieval", max_new_tokens=0, headline="mean_recall", score=_score_by_embedding,
                      eval_task_type="zero-shot-image-classification", example_prompt="a photo of a cat.",
                      pipeline_tag="zero-shot-image-classification", kind="contrastive",
                      also_headline="zeroshot_top1"),
}
