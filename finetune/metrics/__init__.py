"""Evaluation metrics that agree with the official reference implementations.

* :func:`vqa_accuracy` / :func:`vqa_accuracy_by_type`: the official VQA
  evaluation (GT-Vision-Lab/VQA ``vqaEval.py``).
* :func:`caption_metrics`: COCO caption BLEU-1..4, ROUGE-L and CIDEr-D via
  pycocoevalcap's scorers, with a pure-Python PTB-style tokenizer
  (:func:`coco_tokenize`) instead of the Java one.
* :func:`rouge_l` / :func:`dialogue_metrics`: COCO ROUGE-L for free-form text.
* :func:`retrieval_metrics` / :func:`zeroshot_metrics`: image-text recall@1/5/10
  both ways (every caption of an image counts) and zero-shot top-1/top-5, as
  CLIP_benchmark computes them.

pycocoevalcap is imported only when a caption metric is computed.
"""

from .captioning import (
    caption_metrics,
    caption_metrics_with_scores,
    dialogue_metrics,
    rouge_l,
    rouge_l_with_scores,
)
from .retrieval import retrieval_metrics, zeroshot_metrics
from .text import coco_tokenize
from .vqa import normalize_vqa_answer, vqa_accuracy, vqa_accuracy_by_type

__all__ = [
    "caption_metrics",
    "caption_metrics_with_scores",
    "coco_tokenize",
    "dialogue_metrics",
    "normalize_vqa_answer",
    "retrieval_metrics",
    "rouge_l",
    "rouge_l_with_scores",
    "vqa_accuracy",
    "vqa_accuracy_by_type",
    "zeroshot_metrics",
]
