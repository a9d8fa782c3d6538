"""Evaluation metrics that agree with the official reference implementations.

* :func:`vqa_accuracy` / :func:`vqa_accuracy_by_type`: the official VQA
  evaluation (GT-Vision-Lab/VQA ``vqaEval.py``).
* :func:`caption_metrics`: COCO caption BLEU-1..4, ROUGE-L and CIDEr-D via
  pycocoevalcap's scorers, with a pure-Python PTB-style tokenizer
  (:func:`coco_tokenize`) instead of the Java one.
* :func:`rouge_l` / :func:`dialogue_metrics`: COCO ROUGE-L for free-form text.
* :func:`cider_scores` / :func:`rouge_l_scores`: the same scorers' per-example values.

pycocoevalcap is imported only when a caption metric is computed.
"""

from .captioning import (
    caption_metrics,
    cider_scores,
    dialogue_metrics,
    rouge_l,
    rouge_l_scores,
)
from .text import coco_tokenize
from .vqa import normalize_vqa_answer, vqa_accuracy, vqa_accuracy_by_type

__all__ = [
    "caption_metrics",
    "cider_scores",
    "coco_tokenize",
    "dialogue_metrics",
    "normalize_vqa_answer",
    "rouge_l",
    "rouge_l_scores",
    "vqa_accuracy",
    "vqa_accuracy_by_type",
]
