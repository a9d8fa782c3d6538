"""Corpus-level caption metrics computed by the COCO caption evaluation scorers.

The scores come from pycocoevalcap's own pure-Python scorers (``Bleu(4)`` with
the "closest" reference length, ``Rouge`` with beta 1.2, ``Cider`` = CIDEr-D
with sigma 6), so they equal the COCO numbers for the same tokens.  Only the
tokenisation differs: COCO runs the Java PTBTokenizer, we use
:func:`finetune.metrics.text.coco_tokenize` (see its module for the rare cases
where the two disagree).  The scorers are imported when first used, so
``import finetune.metrics`` works without pycocoevalcap or Java.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

from .text import coco_tokenize


def _prepare(
    predictions: Sequence[str],
    references: Sequence[Sequence[str] | str],
    tokenize: bool,
) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """Build pycocoevalcap's ``gts``/``res`` dicts (image id -> list of captions)."""
    if len(predictions) != len(references):
        raise ValueError(
            f"{len(predictions)} predictions but {len(references)} reference lists"
        )
    if not predictions:
        raise ValueError("no predictions to score")
    tok = coco_tokenize if tokenize else (lambda s: s)
    gts: dict[int, list[str]] = {}
    res: dict[int, list[str]] = {}
    for i, (pred, refs) in enumerate(zip(predictions, references)):
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not refs:
            raise ValueError(f"prediction {i} has no reference captions")
        gts[i] = [tok(r) for r in refs]
        res[i] = [tok(pred)]
    return gts, res


def caption_metrics(
    predictions: Sequence[str],
    references: Sequence[Sequence[str] | str],
    tokenize: bool = True,
) -> dict[str, float]:
    """COCO caption metrics: BLEU-1..4, ROUGE-L and CIDEr (CIDEr-D), corpus level.

    ``references[i]`` holds the reference captions of ``predictions[i]``.  With
    ``tokenize=False`` the captions must already be tokenised (space-separated).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = _prepare(predictions, references, tokenize)
    with contextlib.redirect_stdout(io.StringIO()):  # the scorers like to print
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        rouge, _ = Rouge().compute_score(gts, res)
        cider, _ = Cider().compute_score(gts, res)
    scores = {f"BLEU-{n}": float(b) for n, b in enumerate(bleu, start=1)}
    scores["ROUGE-L"] = float(rouge)
    scores["CIDEr"] = float(cider)
    return scores


def rouge_l(
    predictions: Sequence[str],
    references: Sequence[Sequence[str] | str],
    tokenize: bool = True,
) -> float:
    """COCO ROUGE-L (LCS F-measure, beta 1.2, best reference) averaged over predictions."""
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = _prepare(predictions, references, tokenize)
    return float(Rouge().compute_score(gts, res)[0])


def cider_scores(
    predictions: Sequence[str],
    references: Sequence[Sequence[str] | str],
    tokenize: bool = True,
) -> list[float]:
    """Per-prediction CIDEr-D: pycocoevalcap's per-image scores (document frequencies from the whole
    corpus, so their mean is the corpus CIDEr of :func:`caption_metrics`)."""
    from pycocoevalcap.cider.cider import Cider

    gts, res = _prepare(predictions, references, tokenize)
    return [float(s) for s in Cider().compute_score(gts, res)[1]]


def rouge_l_scores(
    predictions: Sequence[str],
    references: Sequence[Sequence[str] | str],
    tokenize: bool = True,
) -> list[float]:
    """Per-prediction COCO ROUGE-L (pycocoevalcap's per-image scores; their mean is :func:`rouge_l`)."""
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = _prepare(predictions, references, tokenize)
    return [float(s) for s in Rouge().compute_score(gts, res)[1]]


def dialogue_metrics(
    predictions: Sequence[str], references: Sequence[Sequence[str] | str]
) -> dict[str, float]:
    """Metrics for free-form answers / dialogue turns: ROUGE-L for now."""
    return {"ROUGE-L": rouge_l(predictions, references)}
