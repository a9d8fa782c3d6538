"""Image-text retrieval recall@K and zero-shot top-K accuracy, as CLIP-style papers report them.

Retrieval follows the COCO / Flickr30k convention of CLIP_benchmark
(``clip_benchmark.metrics.zeroshot_retrieval``), checked against it in the
tests: an image counts as retrieved-right at K when *any* of its captions is
among its top-K texts (``text_retrieval_recall@K``, image -> text), a text when
its image is among its top-K images (``image_retrieval_recall@K``, text -> image).

Ties are counted against the model: a candidate scored exactly as high as the
best match ranks above it. The references rank ties by ``torch.topk`` order
(CLIP_benchmark, arbitrary) or by reversed index (scikit-learn), so they
disagree with each other there; ranking ties pessimistically is the one choice
that never rewards a collapsed model whose scores are all equal. Without ties
all agree.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RECALL_KS = (1, 5, 10)
ZEROSHOT_KS = (1, 5)
_BLOCK = 1024  # rows / columns at a time: a COCO-sized matrix (5k x 25k) needs no full-size temporaries


def retrieval_metrics(similarity, image_of_text, ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """Recall@K both ways and their mean.

    similarity: (images, texts) scores, higher is better (cosine or logits); a
    numpy array, a torch tensor (any float dtype, any device) or nested lists.
    image_of_text: for each text (column), the index of the image (row) it
    describes; every image needs at least one text.

    Returns ``text_retrieval_recall@K`` (image -> text), ``image_retrieval_recall@K``
    (text -> image) for each K, and ``mean_recall``, their mean.
    """
    sim, owner = _array(similarity, float), _array(image_of_text, int)
    if sim.ndim != 2 or owner.shape != (sim.shape[1],):
        raise ValueError(f"similarity must be (images, texts) and image_of_text (texts,): {sim.shape}, {owner.shape}")
    n_images, n_texts = sim.shape
    if owner.size and (owner.min() < 0 or owner.max() >= n_images):
        raise ValueError("image_of_text holds an index outside the similarity's rows")
    if missing := sorted(set(range(n_images)) - set(owner.tolist())):
        raise ValueError(f"images without any text: {missing[:10]}")
    # The rank of the best match is the number of non-matches scored at least as high.
    image_rank = np.empty(n_images, dtype=np.int64)
    for start in range(0, n_images, _BLOCK):
        rows = sim[start : start + _BLOCK]
        match = owner[None, :] == np.arange(start, start + len(rows))[:, None]
        best = np.where(match, rows, -np.inf).max(axis=1, keepdims=True)
        image_rank[start : start + len(rows)] = ((rows >= best) & ~match).sum(axis=1)
    text_rank = np.empty(n_texts, dtype=np.int64)
    for start in range(0, n_texts, _BLOCK):
        cols, own = sim[:, start : start + _BLOCK], owner[start : start + _BLOCK]
        match = np.arange(n_images)[:, None] == own[None, :]
        score = cols[own, np.arange(len(own))]  # each text's score with its own image
        text_rank[start : start + len(own)] = ((cols >= score) & ~match).sum(axis=0)
    metrics = {f"text_retrieval_recall@{k}": float((image_rank < k).mean()) for k in ks}
    metrics.update({f"image_retrieval_recall@{k}": float((text_rank < k).mean()) for k in ks})
    metrics["mean_recall"] = sum(metrics.values()) / len(metrics)
    return metrics


def zeroshot_metrics(logits, labels, ks: Sequence[int] = ZEROSHOT_KS) -> dict[str, float]:
    """``zeroshot_top{K}``: share of examples whose true class is among the K best-scored classes.

    logits: (examples, classes) scores; labels: true class index per example.
    With K at or above the number of classes the accuracy is 1 (scikit-learn's
    ``top_k_accuracy_score`` agrees).
    """
    scores, target = _array(logits, float), _array(labels, int)
    if scores.ndim != 2 or target.shape != (scores.shape[0],):
        raise ValueError(f"logits must be (examples, classes) and labels (examples,): {scores.shape}, {target.shape}")
    if target.size and (target.min() < 0 or target.max() >= scores.shape[1]):
        raise ValueError("a label is outside the logits' classes")
    true = scores[np.arange(len(target)), target][:, None]
    rank = (scores >= true).sum(axis=1) - 1  # other classes scored at least as high
    return {f"zeroshot_top{k}": float((rank < k).mean()) for k in ks}


def _array(x, kind: type) -> np.ndarray:
    """numpy view of an array-like; torch tensors without importing torch (bf16 has no numpy dtype)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        x = (x.float() if x.is_floating_point() else x.long()).numpy()
    x = np.asarray(x)
    if kind is int:
        return x.astype(np.int64, copy=False)
    return x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float64)
