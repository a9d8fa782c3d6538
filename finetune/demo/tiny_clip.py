"""The embedded dual-encoder checkpoint "tiny-clip", built locally (no Hub access).

A 0.2M-parameter ``CLIPModel`` with a real ``CLIPTokenizer`` (byte-level BPE
trained here with CLIP's own normaliser and pre-tokeniser) and the PIL backend
of CLIP's image processor (no torchvision). The folder loads with
``AutoModel`` and ``AutoProcessor`` exactly like a Hub download of a CLIP
checkpoint.

LoRA needs a base that already works, so the build pre-trains it on synthetic
shapes in two stages: the vision tower first learns to see colour, shape,
count and position (a stand-in for a pre-trained backbone), then both towers
train with CLIP's loss on captions that name only the shape and the number
("a circle", "three squares"), never the colour or the place: pre-training
data that is silent about what a user's domain cares about. The base is a
real but weak retriever (held-out mean recall ~0.2, shapes told apart, colours
at chance); a LoRA fine-tune on the full synthetic captions ("two red circles
on the left") or on colour class prompts teaches it the rest in seconds.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import torch
from tokenizers import pre_tokenizers
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
)

from finetune.contrastive import dual_encoder_loss, embed_images, embed_texts
from finetune.demo import pretraining, synthetic
from finetune.demo.cache import cache_dir, cached_build
from finetune.metrics.retrieval import retrieval_metrics, zeroshot_metrics

logger = logging.getLogger(__name__)

TINY_CLIP = "tiny-clip"
TINY_CLIP_VERSION = "v1"  # bump whenever the build changes, so stale caches are rebuilt

PATCH_SIZE = 8
MAX_TEXT_TOKENS = 24
TEXT = {"hidden": 64, "layers": 2, "heads": 4, "intermediate": 128}
VISION = {"hidden": 64, "layers": 2, "heads": 4, "intermediate": 128}
PROJECTION = 64
TRAIN = {
    "pool": 2000,  # pre-training scenes (their own seed: disjoint from the train/eval splits)
    "batch": 64,
    "warmup": 20,
    "steps": 300,
    "lr": 2e-3,
    "vision_steps": 300,
    "vision_lr": 2e-3,
}

# Zero-shot class prompts per attribute: what a user would write as class names.
CLASS_PROMPTS = {
    "color": {c: f"{c} shapes" for c in synthetic.COLORS},
    "shape": {s: f"{s}s" for s in synthetic.SHAPES},
    "count": {str(k): f"{w} shapes" for k, w in synthetic.COUNT_WORDS.items()},
    "position": {p: f"shapes {'on' if p in ('left', 'right') else 'at'} the {p}" for p in synthetic.POSITIONS},
}


def tiny_clip_path() -> Path:
    """The cached tiny-clip folder, built on first use (safe across processes)."""
    final = cache_dir() / "models" / f"{TINY_CLIP}-{TINY_CLIP_VERSION}"
    return cached_build(final, build_tiny_clip, marker="config.json")


def build_tiny_clip(out_dir: str | os.PathLike, seed: int = 0) -> None:
    """Builds tokenizer + processor, pre-trains the model and saves both to ``out_dir``."""
    logger.info("building the embedded %s checkpoint (first use only, well under a minute on a CPU)", TINY_CLIP)
    torch.manual_seed(seed)
    processor = build_processor()
    model = build_model(processor.tokenizer)
    threads = torch.get_num_threads()
    # Operations this small gain nothing from intra-op threads, and on a busy CPU
    # (tests, other jobs) two threads ran each step 6-8x slower than one.
    torch.set_num_threads(1)
    try:
        pretrain(model, processor, seed)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    processor.save_pretrained(out_dir)
    model.save_pretrained(out_dir)


# --- tokenizer, processor, model ----------------------------------------------


def pretraining_caption(scene: synthetic.Scene) -> str:
    """Shape and number only: ``"a circle"``, ``"three squares"``."""
    return f"{synthetic.COUNT_WORDS[scene.count]} {scene.shape}s" if scene.count > 1 else f"a {scene.shape}"


def build_tokenizer() -> CLIPTokenizer:
    """A real ``CLIPTokenizer`` (CLIP's lower-casing, split and byte-level BPE with ``</w>``) trained on our texts.

    Laid out like CLIP's own vocabulary: the 256 byte symbols, the same with
    ``</w>``, the merged symbols in merge order, then the two special tokens.
    The second block matters: without it a word ending in a letter the corpus
    never ends a word with ("of") would map to the unknown token, which CLIP
    sets to ``<|endoftext|>``, and the text model would stop reading there.
    """
    texts = [text for prompts in CLASS_PROMPTS.values() for text in prompts.values()]
    for scene in synthetic.make_scenes(600, seed=12345):
        texts += [scene.caption(), pretraining_caption(scene)]
    trained = CLIPTokenizer().train_new_from_iterator(texts, vocab_size=1000, show_progress=False)
    merges = [tuple(pair) for pair in json.loads(trained.backend_tokenizer.to_str())["model"]["merges"]]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    symbols = [*alphabet, *(c + "</w>" for c in alphabet), *dict.fromkeys(a + b for a, b in merges)]
    vocab = {symbol: i for i, symbol in enumerate([*symbols, "<|startoftext|>", "<|endoftext|>"])}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TEXT_TOKENS)


def build_processor() -> CLIPProcessor:
    size = synthetic.IMAGE_SIZE
    # The PIL backend: works without torchvision.
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return CLIPProcessor(image_processor=image_processor, tokenizer=build_tokenizer())


def build_model(tokenizer: CLIPTokenizer) -> CLIPModel:
    # CLIP pools the text at the first eos token; id 2 would select the legacy argmax pooling.
    assert tokenizer.eos_token_id != 2, "eos id 2 switches CLIPTextTransformer to its legacy pooling"
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": TEXT["hidden"],
        "intermediate_size": TEXT["intermediate"],
        "num_hidden_layers": TEXT["layers"],
        "num_attention_heads": TEXT["heads"],
        "max_position_embeddings": MAX_TEXT_TOKENS,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {
        "hidden_size": VISION["hidden"],
        "intermediate_size": VISION["intermediate"],
        "num_hidden_layers": VISION["layers"],
        "num_attention_heads": VISION["heads"],
        "image_size": synthetic.IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
    }
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=PROJECTION))


# --- pre-training ---------------------------------------------------------------


def pretrain(model: CLIPModel, processor: CLIPProcessor, seed: int = 0) -> None:
    """Vision warm-up, then every parameter with CLIP's loss on shape-and-number captions of synthetic scenes.

    The scenes come from their own seed, so the synthetic train/eval splits stay unseen.
    """
    cfg = TRAIN
    gen = torch.Generator().manual_seed(seed)
    scenes = synthetic.make_scenes(cfg["pool"], seed=2_000_003 + seed)
    batch = processor(
        text=[pretraining_caption(s) for s in scenes],
        images=[synthetic.render(s) for s in scenes],
        padding=True,
        return_tensors="pt",
    )
    model.train()
    if cfg["vision_steps"]:
        _pretrain_vision(model, batch["pixel_values"], scenes, gen)
    params = list(model.parameters())
    opt, sched = pretraining.optimizer(params, cfg["lr"], cfg["steps"], TRAIN["warmup"])
    start = time.time()
    for step in range(cfg["steps"]):
        rows = torch.randint(len(scenes), (cfg["batch"],), generator=gen)
        loss = dual_encoder_loss(model, {k: v[rows] for k, v in batch.items()})
        pretraining.step(loss, params, opt, sched)
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # CLIP's cap on the temperature
        if step % 100 == 0 or step == cfg["steps"] - 1:
            logger.info("contrastive pre-training step %d: loss %.3f (%.0fs)", step, loss.item(), time.time() - start)


def _pretrain_vision(model, pixel_values, scenes, gen) -> None:
    """Stage 1: the vision tower learns to see all four attributes (stands in for a pre-trained backbone)."""
    cfg = TRAIN
    values = {
        "color": list(synthetic.COLORS),
        "shape": list(synthetic.SHAPES),
        "count": list(synthetic.COUNT_WORDS),
        "position": list(synthetic.POSITIONS),
    }
    targets = {a: torch.tensor([v.index(getattr(s, a)) for s in scenes]) for a, v in values.items()}
    heads = torch.nn.ModuleDict({a: torch.nn.Linear(PROJECTION, len(v)) for a, v in values.items()})
    params = [*model.vision_model.parameters(), *model.visual_projection.parameters(), *heads.parameters()]
    opt, sched = pretraining.optimizer(params, cfg["vision_lr"], cfg["vision_steps"], TRAIN["warmup"])
    start = time.time()
    for step in range(cfg["vision_steps"]):
        rows = torch.randint(len(scenes), (cfg["batch"],), generator=gen)
        features = model.get_image_features(pixel_values=pixel_values[rows]).pooler_output
        losses = {a: torch.nn.functional.cross_entropy(head(features), targets[a][rows]) for a, head in heads.items()}
        pretraining.step(sum(losses.values()), params, opt, sched)
        if step % 100 == 0 or step == cfg["vision_steps"] - 1:
            shown = " ".join(f"{a} {v.item():.3f}" for a, v in losses.items())
            logger.info("vision pre-training step %d: %s (%.0fs)", step, shown, time.time() - start)


# --- held-out scores (tests, demos) -----------------------------------------------


def eval_scenes(n: int = 100, seed: int | None = None) -> list[synthetic.Scene]:
    """``n`` held-out scenes (the eval split's by default) with pairwise different captions.

    Distinct captions keep retrieval well posed: each caption matches one image.
    """
    scenes, seen = [], set()
    for scene in synthetic.make_scenes(20 * n, synthetic.SPLIT_SEEDS["eval"] if seed is None else seed):
        if scene.caption() not in seen:
            seen.add(scene.caption())
            scenes.append(scene)
        if len(scenes) == n:
            return scenes
    raise ValueError(f"fewer than {n} distinct captions")


@torch.no_grad()
def scene_embeddings(model, processor, scenes, texts) -> tuple[torch.Tensor, torch.Tensor]:
    images = processor(images=[synthetic.render(s) for s in scenes], return_tensors="pt")
    tokens = processor(text=list(texts), padding=True, return_tensors="pt")
    return embed_images(model, images), embed_texts(model, tokens)


def retrieval_scores(model, processor, n: int = 100, seed: int | None = None) -> dict[str, float]:
    """Recall@1/5/10 both ways and mean_recall on ``n`` held-out scenes with their full captions."""
    scenes = eval_scenes(n, seed)
    images, texts = scene_embeddings(model, processor, scenes, [s.caption() for s in scenes])
    return retrieval_metrics(images @ texts.t(), torch.arange(len(scenes)))


def zeroshot_scores(model, processor, attribute: str, n: int = 100, seed: int | None = None) -> dict[str, float]:
    """Zero-shot top-1/top-5 classifying held-out scenes by ``attribute`` (color, shape, count, position)."""
    prompts = CLASS_PROMPTS[attribute]
    scenes = eval_scenes(n, seed)
    images, classes = scene_embeddings(model, processor, scenes, prompts.values())
    labels = torch.tensor([list(prompts).index(s.answers()[attribute]) for s in scenes])
    return zeroshot_metrics(images @ classes.t(), labels)
