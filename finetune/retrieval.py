"""Evaluation and prediction for dual encoders: recall@K both ways on image-text pairs, zero-shot top-K on
labelled images, and ranking a user's labels for one image."""

from __future__ import annotations

import time

import torch

from finetune.config import Recipe
from finetune.contrastive import embed_images, embed_texts, uses_sigmoid_loss
from finetune.data.images import open_image
from finetune.data.pairs import PairExample, load_pairs, processor_batch
from finetune.errors import DataError
from finetune.metrics.retrieval import retrieval_metrics, zeroshot_metrics
from finetune.parallelism import gather_in_order, my_share
from finetune.precision import compute_dtype, inference_autocast

TOP = 5  # predictions.jsonl keeps each image's best texts


def eval_pairs(recipe: Recipe) -> list[PairExample]:
    examples, report = load_pairs(recipe.data.eval, recipe.data, recipe.data.eval_split or "validation")
    if report.problems and recipe.data.on_error == "fail":
        raise DataError(report.summary() + "\n(set data.on_error=skip to drop these rows)")
    if not examples:
        raise DataError(f"{report.source}: no usable example left")
    return examples[: recipe.eval.max_examples] if recipe.eval.max_examples else examples


@torch.no_grad()
def image_embeddings(model, processor, images: list, batch_size: int) -> torch.Tensor:
    """One normalised row per image (each process embeds its share; every process gets all rows, in order)."""
    chunks, images, dtype = [], my_share(images), compute_dtype(model)
    with inference_autocast(model):
        for start in range(0, len(images), batch_size):
            batch = processor_batch(processor, None, images[start : start + batch_size])
            chunks.append(embed_images(model, _to(batch, model.device, dtype)).float().cpu())
    return torch.cat(gather_in_order(chunks))


@torch.no_grad()
def text_embeddings(model, processor, texts: list[str], batch_size: int) -> torch.Tensor:
    chunks, texts, dtype = [], my_share(texts), compute_dtype(model)
    with inference_autocast(model):
        for start in range(0, len(texts), batch_size):
            batch = processor_batch(processor, texts[start : start + batch_size], None)
            chunks.append(embed_texts(model, _to(batch, model.device, dtype)).float().cpu())
    return torch.cat(gather_in_order(chunks))


def class_embeddings(model, processor, labels: list[str], templates: list[str], batch_size: int) -> torch.Tensor:
    """One embedding per class: the normalised mean of its prompts' embeddings (CLIP's prompt ensembling)."""
    prompts = [t.format(label=label) for label in labels for t in templates]
    embeds = text_embeddings(model, processor, prompts, batch_size).view(len(labels), len(templates), -1).mean(1)
    return embeds / embeds.norm(dim=-1, keepdim=True)


def score_pairs(model, processor, examples: list[PairExample], templates: list[str],
                batch_size: int = 64) -> tuple[dict, list[dict]]:
    """Recall@K both ways (pairs) or zero-shot top-K (classification rows); one prediction row per image with
    its best texts (or classes), their scores and whether each is a true match."""
    labelled = [e.label is not None for e in examples]
    if any(labelled) and not all(labelled):
        raise DataError("data.eval mixes classification rows (label) with caption rows: score one kind at a time")
    start = time.perf_counter()
    images = image_embeddings(model, processor, [open_image(e.image, e.root) for e in examples], batch_size)
    if all(labelled):
        labels = sorted({e.label for e in examples})
        texts = labels
        similarity = images @ class_embeddings(model, processor, labels, templates, batch_size).T
        truth = [[labels.index(e.label)] for e in examples]
        metrics = zeroshot_metrics(similarity, [t[0] for t in truth])
    else:
        texts = [text for e in examples for text in e.texts]
        owner = [i for i, e in enumerate(examples) for _ in e.texts]
        similarity = images @ text_embeddings(model, processor, texts, batch_size).T
        truth = [[j for j, o in enumerate(owner) if o == i] for i in range(len(examples))]
        metrics = retrieval_metrics(similarity, owner)
    seconds = time.perf_counter() - start
    metrics["examples"] = len(examples)
    metrics["examples_per_second"] = round(len(examples) / max(seconds, 1e-9), 3)
    predictions = []
    for example, row, matches in zip(examples, similarity, truth):
        best = row.topk(min(TOP, len(texts))).indices.tolist()
        top = [{"text": texts[j], "score": round(float(row[j]), 6), "match": j in matches} for j in best]
        predictions.append({"id": example.id or example.location, "images": _image_paths(example),
                            "prompt": "", "prediction": top[0]["text"], "references": [texts[j] for j in matches],
                            "top5": top, "score": 1.0 if top[0]["match"] else 0.0})
    return metrics, predictions


@torch.no_grad()
def rank_labels(model, processor, image, labels: list[str], templates: list[str]) -> list[tuple[str, float]]:
    """The labels for one image, best first, with probabilities: a softmax over the labels for CLIP-style models
    (trained to pick one text), each label's own sigmoid for SigLIP-style ones (trained pair by pair)."""
    if not labels:
        raise DataError("--labels is empty: give comma-separated class names, e.g. --labels 'cat,dog'")
    image_embed = image_embeddings(model, processor, [image], 1)
    cosine = (image_embed @ class_embeddings(model, processor, labels, templates, 64).T)[0]
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    logits = cosine * core.logit_scale.detach().float().exp().cpu()
    if uses_sigmoid_loss(core):
        probabilities = torch.sigmoid(logits + core.logit_bias.detach().float().cpu())
    else:
        probabilities = logits.softmax(-1)
    ranked = sorted(zip(labels, probabilities.tolist()), key=lambda pair: -pair[1])
    return [(label, round(p, 4)) for label, p in ranked]


def _to(batch, device, dtype) -> dict:
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in batch.items()}


def _image_paths(example: PairExample) -> list[str]:
    value = example.image
    if isinstance(value, dict):
        value = None if value.get("bytes") else value.get("path")
    if not isinstance(value, str) or value.startswith(("http://", "https://", "data:")):
        return []
    path = (example.root / value) if example.root and not value.startswith("/") else None
    return [str(path.resolve()) if path else value]
