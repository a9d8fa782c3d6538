"""Retrieval recall@K and zero-shot top-K against values produced by CLIP_benchmark and scikit-learn.

tests/assets/metrics/retrieval_reference.json was generated once, outside this
repository, by running clip_benchmark's own evaluate() / accuracy() and
scikit-learn's top_k_accuracy_score (provenance inside); nothing here
recomputes the references.
"""

import json
from pathlib import Path

import pytest
import torch

from finetune.metrics import retrieval_metrics, zeroshot_metrics

REF = json.loads((Path(__file__).parent / "assets" / "metrics" / "retrieval_reference.json").read_text())
RETRIEVAL = REF["retrieval"]
ZEROSHOT = REF["zeroshot"]
KEYS = [f"{side}_retrieval_recall@{k}" for side in ("text", "image") for k in (1, 5, 10)]


def test_reference_carries_provenance():
    assert "clip-benchmark==" in REF["provenance"]["implementation"]
    assert REF["provenance"]["how_run"] and REF["provenance"]["date"]


@pytest.mark.parametrize("case", RETRIEVAL, ids=[c["note"] for c in RETRIEVAL])
def test_retrieval_matches_clip_benchmark(case):
    got = retrieval_metrics(case["similarity"], case["image_of_text"])
    assert list(got) == [*KEYS, "mean_recall"]  # the pinned metrics.json keys
    for key in KEYS:
        # The reference averages in float32.
        assert got[key] == pytest.approx(case["expected"][key], abs=1e-6), key
    assert got["mean_recall"] == pytest.approx(sum(case["expected"][k] for k in KEYS) / 6, abs=1e-6)


def test_retrieval_ties_count_against_the_model():
    """The references break ties in whatever order torch.topk returns; finetune ranks the match below its ties."""
    collapsed = next(c for c in RETRIEVAL if "collapsed" in c["note"])
    assert collapsed["clip_benchmark_topk_tie_order"]["text_retrieval_recall@10"] > 0.5  # a lucky topk order
    assert retrieval_metrics(collapsed["similarity"], collapsed["image_of_text"])["mean_recall"] == 0.0


def test_retrieval_accepts_tensors_in_any_float_dtype():
    case = next(c for c in RETRIEVAL if "COCO" in c["note"])
    sim = torch.tensor(case["similarity"])
    expected = retrieval_metrics(case["similarity"], case["image_of_text"])
    assert retrieval_metrics(sim.double(), torch.tensor(case["image_of_text"])) == expected
    assert retrieval_metrics(sim.numpy(), case["image_of_text"]) == expected


def test_retrieval_blocks_give_the_same_answer(monkeypatch):
    from finetune.metrics import retrieval

    case = next(c for c in RETRIEVAL if "5 captions" in c["note"])
    expected = retrieval_metrics(case["similarity"], case["image_of_text"])
    monkeypatch.setattr(retrieval, "_BLOCK", 7)  # 12 images, 60 texts: several uneven blocks each way
    assert retrieval_metrics(case["similarity"], case["image_of_text"]) == expected


def test_retrieval_rejects_bad_input():
    with pytest.raises(ValueError, match="without any text"):
        retrieval_metrics(torch.zeros(3, 2), [0, 1])
    with pytest.raises(ValueError, match="outside"):
        retrieval_metrics(torch.zeros(2, 2), [0, 2])
    with pytest.raises(ValueError, match="images, texts"):
        retrieval_metrics(torch.zeros(2, 3), [0, 1])


@pytest.mark.parametrize("case", ZEROSHOT, ids=[c["note"] for c in ZEROSHOT])
def test_zeroshot_matches_references(case):
    got = zeroshot_metrics(case["logits"], case["labels"])
    assert list(got) == ["zeroshot_top1", "zeroshot_top5"]
    for key, value in case["expected"].items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    if "ties" not in case["note"]:  # both references agree when nothing ties
        assert case["sklearn_top_k_accuracy_score"] == case["expected"]
        if "clip_benchmark_accuracy" in case:
            assert case["clip_benchmark_accuracy"] == pytest.approx(case["expected"])


def test_zeroshot_rejects_bad_input():
    with pytest.raises(ValueError, match="outside"):
        zeroshot_metrics(torch.zeros(2, 3), [0, 3])
    with pytest.raises(ValueError, match="examples, classes"):
        zeroshot_metrics(torch.zeros(2, 3), [0])
