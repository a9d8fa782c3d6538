"""The embedded default checkpoint "tiny-llava", built locally (no Hub access).

A 0.7M-parameter LLaVA (CLIP vision tower + LLaVA projector + Llama decoder)
with a real byte-level BPE tokenizer and a ChatML chat template. The folder it
produces loads with ``AutoModelForImageTextToText`` and ``AutoProcessor``
exactly like a Hub download.

LoRA cannot learn on a randomly initialised model, so the build also
*pre-trains* the whole model on synthetic shape images, LLaVA-style: it becomes
a captioner (plus a tiny text-only language model) that does not yet answer
visual questions, which is a realistic base for a VQA LoRA fine-tune.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from finetune.demo import pretraining, synthetic
from finetune.demo.cache import cache_dir, cached_build

logger = logging.getLogger(__name__)

TINY_LLAVA = "tiny-llava"
TINY_LLAVA_VERSION = "v2"  # bump whenever the build changes, so stale caches are rebuilt

IMAGE_TOKEN, IM_START, IM_END, PAD = "<image>", "<|im_start|>", "<|im_end|>", "<|pad|>"
PATCH_SIZE = 8  # with 16 px patches the tower told 12 px circles from squares ~80% of the time; 8 px: 99%
NUM_IMAGE_TOKENS = (synthetic.IMAGE_SIZE // PATCH_SIZE) ** 2  # 64: CLS is dropped ("default" strategy)

TEXT = {"hidden": 128, "layers": 2, "heads": 4, "intermediate": 256}
VISION = {"hidden": 96, "layers": 2, "heads": 4, "intermediate": 192}
TRAIN = {
    "pool": 3000,  # pre-training scenes (their own seed: disjoint from the train/eval splits)
    "batch": 32,
    "warmup": 50,
    "vision_steps": 800,
    "vision_lr": 2e-3,
    "steps": 500,
    "lr": 1e-3,
    "text_every": 5,  # every 5th step is a text-only batch
}

# ChatML. Content is a string (with "<image>" placeholders) or a list of parts;
# an image part renders as "<image>" plus "\n" when more parts follow, so
# [image, text "Q"] renders exactly like the LLaVA-style string "<image>\nQ".
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<image>' -}}{%- if not loop.last -%}{{- '\\n' -}}{%- endif -%}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# LLaVA pre-training pairs each caption with one of several brief-description
# instructions; the variety keeps the decoder's reading of the image from being
# tied to one exact prompt, which makes the later VQA LoRA easier.
CAPTION_PROMPTS = (
    synthetic.DESCRIBE_PROMPT,
    "What is in this picture?",
    "Write a short caption for the image.",
    "Give a brief description of the image.",
    "Summarize what you see.",
)

# Generic English-like text: teaches the tokenizer common words and gives the
# decoder a little language modelling beyond the captions.
GENERIC_TEXT = """\
The quick brown fox jumps over the lazy dog.
A picture is worth a thousand words, but a caption only needs a few.
The weather today is sunny with a light breeze from the west.
She opened the window and looked at the garden below.
Please answer the question in one word.
There is a small house next to the river, and the door is open.
Numbers such as 0, 1, 2, 3, 4, 5, 6, 7, 8, 9 and 10 appear in many texts.
He wrote a short letter to his friend and sent it in the morning.
The model looks at the image and describes what it sees.
What is your name? Where do you live? How old are you? Why is the sky blue?
Colors like black, white, gray, pink and brown are common in photos.
Many people like to read books, drink coffee and walk in the park.
The cat sat on the mat while the dog slept by the fire.
Shapes can be round, square or pointed, large or small, near or far.
Yes, no, maybe: short answers are often the best ones.
"""


def tiny_llava_path() -> Path:
    """The cached tiny-llava folder, built on first use (safe across processes)."""
    final = cache_dir() / "models" / f"{TINY_LLAVA}-{TINY_LLAVA_VERSION}"
    return cached_build(final, build_tiny_llava, marker="config.json")


def build_tiny_llava(out_dir: Path, seed: int = 0, pretrained: bool = True) -> None:
    """Builds tokenizer + processor and the model, pre-trains it (unless `pretrained=False`: random weights in
    seconds, for tests of processors and labels) and saves both to ``out_dir``."""
    if pretrained:
        logger.info("building the embedded %s checkpoint (first use only, 1-2 minutes on a CPU)", TINY_LLAVA)
    torch.manual_seed(seed)
    processor = build_processor()
    model = build_model(processor.tokenizer)
    if pretrained:
        pretrain(model, processor, seed)
    model.eval()
    processor.save_pretrained(out_dir)
    model.save_pretrained(out_dir)


# --- tokenizer, processor, model ----------------------------------------------


def build_tokenizer() -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    # Words, single digits, punctuation runs and whitespace are split apart, so a
    # word has the same token wherever it stands ("red" right after "assistant\n"
    # is the "red" of "two red circles"); byte-level, so nothing is ever unknown.
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\p{L}+|\p{N}|[^\s\p{L}\p{N}]+|\s+"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,  # an upper bound: the small corpus stops at ~600
        special_tokens=[PAD, IM_START, IM_END, IMAGE_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(GENERIC_TEXT.splitlines() + _synthetic_texts(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=IM_END,
        pad_token=PAD,
        image_token=IMAGE_TOKEN,  # read by LlavaProcessor
        extra_special_tokens=[IM_START, IMAGE_TOKEN],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )


def _synthetic_texts() -> list[str]:
    """Every kind of caption, question and dialogue line the synthetic data produces."""
    rng = random.Random(0)
    texts = [*CAPTION_PROMPTS, "user", "assistant", "system"]
    for scene in synthetic.make_scenes(600, seed=12345):
        texts.append(scene.caption())
        texts += [f"{q} {a}" for _, q, a in scene.qa_pairs()]
        texts += [f"{u} {a}" for u, a in scene.dialogue(rng)]
    return texts


def build_processor() -> LlavaProcessor:
    size = synthetic.IMAGE_SIZE
    # The PIL backend: works without torchvision.
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, which "default" then drops
        image_token=IMAGE_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )


def build_model(tokenizer: PreTrainedTokenizerFast) -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(
        hidden_size=VISION["hidden"],
        intermediate_size=VISION["intermediate"],
        num_hidden_layers=VISION["layers"],
        num_attention_heads=VISION["heads"],
        image_size=synthetic.IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=VISION["hidden"],
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT["hidden"],
        intermediate_size=TEXT["intermediate"],
        num_hidden_layers=TEXT["layers"],
        num_attention_heads=TEXT["heads"],
        num_key_value_heads=TEXT["heads"],
        max_position_embeddings=512,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=NUM_IMAGE_TOKENS,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,  # with a 2-layer tower, the penultimate layer would waste half of it
    )
    model = LlavaForConditionalGeneration(config)
    generation = model.generation_config
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    generation.bos_token_id = None
    generation.max_new_tokens = 32  # answers and captions are short
    return model


def caption_prompt(processor, instruction: str = synthetic.DESCRIBE_PROMPT) -> str:
    """The chat-templated generation prompt that asks for a caption."""
    messages = [{"role": "user", "content": f"{IMAGE_TOKEN}\n{instruction}"}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# --- pre-training ---------------------------------------------------------------


def pretrain(model, processor, seed: int = 0) -> None:
    """Trains every parameter: a vision warm-up, then captioning mixed with text-only batches.

    Loss is on the assistant's reply only, as in LLaVA's pre-training. The scenes
    come from their own seed, so the synthetic train/eval splits stay unseen.
    """
    cfg = TRAIN
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    scenes = synthetic.make_scenes(cfg["pool"], seed=1_000_003 + seed)
    captions = _caption_examples(processor, scenes, rng)
    text_ids, text_labels = _text_examples(processor.tokenizer, scenes, rng)
    _pretrain_vision(model, captions["pixel_values"], scenes, gen)

    params = list(model.parameters())
    opt, sched = pretraining.optimizer(params, cfg["lr"], cfg["steps"], TRAIN["warmup"])
    model.train()
    start = time.time()
    for step in range(cfg["steps"]):
        if step % cfg["text_every"] == cfg["text_every"] - 1:
            rows = torch.randint(len(text_ids), (cfg["batch"] // 2,), generator=gen)
            mask = (text_ids[rows] != processor.tokenizer.pad_token_id).long()
            loss = model(input_ids=text_ids[rows], attention_mask=mask, labels=text_labels[rows]).loss
        else:
            rows = torch.randint(len(scenes), (cfg["batch"],), generator=gen)
            loss = model(**{k: v[rows] for k, v in captions.items()}).loss
        pretraining.step(loss, params, opt, sched)
        if step % 100 == 0 or step == cfg["steps"] - 1:
            logger.info("caption pre-training step %d: loss %.3f (%.0fs)", step, loss.item(), time.time() - start)


def _pretrain_vision(model, pixel_values, scenes, gen) -> None:
    """Stage 1: teach the vision tower to see the attributes (stands in for CLIP's pre-training).

    Without it, caption training sits for hundreds of steps at the loss of a
    model that ignores the image.
    """
    cfg = TRAIN
    values = {
        "color": list(synthetic.COLORS),
        "shape": list(synthetic.SHAPES),
        "count": list(synthetic.COUNT_WORDS),
        "position": list(synthetic.POSITIONS),
    }
    targets = {a: torch.tensor([v.index(getattr(s, a)) for s in scenes]) for a, v in values.items()}
    tower = model.model.vision_tower
    heads = torch.nn.ModuleDict({a: torch.nn.Linear(tower.config.hidden_size, len(v)) for a, v in values.items()})
    params = [*tower.parameters(), *heads.parameters()]
    opt, sched = pretraining.optimizer(params, cfg["vision_lr"], cfg["vision_steps"], TRAIN["warmup"])
    start = time.time()
    for step in range(cfg["vision_steps"]):
        rows = torch.randint(len(scenes), (cfg["batch"],), generator=gen)
        tokens = tower(pixel_values[rows], output_hidden_states=True).hidden_states[-1][:, 1:]
        # Mean-pooled, so each patch token must carry what it shows *and* where it
        # is in its own features: that is what the decoder's attention can read.
        pooled = tokens.mean(1)
        losses = {a: torch.nn.functional.cross_entropy(head(pooled), targets[a][rows]) for a, head in heads.items()}
        pretraining.step(sum(losses.values()), params, opt, sched)
        if step % 200 == 0 or step == cfg["vision_steps"] - 1:
            shown = " ".join(f"{a} {v.item():.3f}" for a, v in losses.items())
            logger.info("vision pre-training step %d: %s (%.0fs)", step, shown, time.time() - start)


def _caption_examples(processor, scenes, rng: random.Random) -> dict[str, torch.Tensor]:
    """Chat-templated caption examples; labels cover the caption and its <|im_end|> only."""
    prompts = [caption_prompt(processor, rng.choice(CAPTION_PROMPTS)) for _ in scenes]
    texts = [prompt + scene.caption() + IM_END for prompt, scene in zip(prompts, scenes)]
    images = [synthetic.render(scene) for scene in scenes]
    batch = processor(text=texts, images=images, padding=True, return_tensors="pt")
    labels = batch["input_ids"].clone()
    for row, prompt in enumerate(prompts):
        expanded = prompt.replace(IMAGE_TOKEN, IMAGE_TOKEN * NUM_IMAGE_TOKENS)  # as the processor does
        labels[row, : len(processor.tokenizer(expanded)["input_ids"])] = -100
    labels[batch["attention_mask"] == 0] = -100
    return {**batch, "labels": labels}


def _text_examples(tokenizer, scenes, rng: random.Random, length: int = 32):
    """Text-only examples: generic text, and questions about a caption given as text.

    The second kind stands in for the instruction following a real LLaVA's
    language model brings along: it learns to pick one attribute out of a
    caption it can read, never out of an image.
    """
    ids = tokenizer(GENERIC_TEXT)["input_ids"]
    rows = [(ids[i : i + length],) * 2 for i in range(0, len(ids) - length + 1, length // 2)]
    for scene in scenes:
        _, question, answer = rng.choice(scene.qa_pairs())
        messages = [{"role": "user", "content": f"{scene.caption()}\n{question}"}]
        prompt = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        reply = tokenizer(answer + IM_END)["input_ids"]
        rows.append((prompt["input_ids"] + reply, [-100] * len(prompt["input_ids"]) + reply))
    width = max(len(x) for x, _ in rows)
    input_ids = torch.tensor([x + [tokenizer.pad_token_id] * (width - len(x)) for x, _ in rows])
    labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in rows])
    return input_ids, labels


@torch.no_grad()
def caption_accuracy(model, processor, n: int = 50, seed: int | None = None) -> float:
    """Greedy-caption exact match on held-out scenes (the eval split's by default)."""
    scenes = synthetic.make_scenes(n, synthetic.SPLIT_SEEDS["eval"] if seed is None else seed)
    prompt = caption_prompt(processor)
    batch = processor(text=[prompt] * n, images=[synthetic.render(s) for s in scenes], return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=24, do_sample=False)
    preds = processor.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return sum(pred.strip() == scene.caption() for pred, scene in zip(preds, scenes)) / n
