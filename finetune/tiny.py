"""The embedded default checkpoint "tiny-llava", built locally (no Hub access).

A few-hundred-thousand-parameter LLaVA (CLIP vision tower + projector + Llama
decoder) with a real byte-level BPE tokenizer and a ChatML chat template. The
folder it produces loads with ``AutoModelForImageTextToText`` and
``AutoProcessor`` exactly like a Hub download.

LoRA cannot learn on a randomly initialised model, so the build also
*pre-trains* the whole model, LLaVA-style, to caption synthetic shape images
(plus a little generic text for the language model). The result is a captioner
that does not yet answer questions: a realistic base for a VQA LoRA fine-tune.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch
from filelock import FileLock
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

from finetune.data import synthetic

TINY_LLAVA = "tiny-llava"
TINY_LLAVA_VERSION = "v1"  # bump when the build changes, to invalidate caches

IMAGE_TOKEN, BOS, EOS, PAD = "<image>", "<|im_start|>", "<|im_end|>", "<|pad|>"
PATCH_SIZE = 16
NUM_IMAGE_TOKENS = (synthetic.IMAGE_SIZE // PATCH_SIZE) ** 2  # CLS is dropped ("default" strategy)

# ChatML. Content is a string (with "<image>" placeholders) or a list of parts;
# an image part renders as "<image>" followed by "\n" when more parts follow,
# so [image, text "Q"] renders exactly like the LLaVA string "<image>\nQ".
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

TEXT = {"hidden": 128, "layers": 2, "heads": 4, "intermediate": 256}
VISION = {"hidden": 96, "layers": 2, "heads": 4, "intermediate": 192}
TRAIN = {"steps": 700, "batch": 32, "lr": 3e-3, "warmup": 50, "pool": 4000, "text_every": 5, "vision_steps": 300, "vision_lr": 3e-3}


def tiny_llava_path() -> Path:
    """The cached tiny-llava folder, built on first use (safe across processes)."""
    root = synthetic.cache_dir() / "models"
    final = root / f"{TINY_LLAVA}-{TINY_LLAVA_VERSION}"
    if (final / "config.json").exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if not (final / "config.json").exists():
            tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}-"))
            try:
                build_tiny_llava(tmp)
                os.replace(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def build_tiny_llava(out_dir: Path, seed: int = 0) -> None:
    """Builds tokenizer + processor, pre-trains the model, saves everything to ``out_dir``."""
    torch.manual_seed(seed)
    processor = build_processor()
    model = build_model(processor.tokenizer)
    pretrain(model, processor, seed)
    model.eval()
    out_dir = Path(out_dir)
    processor.save_pretrained(out_dir)
    model.save_pretrained(out_dir)


def build_tokenizer() -> PreTrainedTokenizerFast:
    corpus = GENERIC_TEXT.splitlines() + _synthetic_texts()
    bpe = Tokenizer(models.BPE())
    # Words, single digits, punctuation runs and whitespace are split apart, so a
    # word has the same token wherever it stands ("red" after "assistant\n" is
    # the "red" of "two red circles"); byte-level, so nothing is ever unknown.
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{L}+|\p{N}|[^\s\p{L}\p{N}]+|\s+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=768,
        special_tokens=[PAD, BOS, EOS, IMAGE_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=EOS,
        pad_token=PAD,
        image_token=IMAGE_TOKEN,
        extra_special_tokens=[BOS, IMAGE_TOKEN],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )


def _synthetic_texts() -> list[str]:
    """Every caption, question and dialogue line the synthetic data can produce."""
    rng = random.Random(0)
    texts = [synthetic.DESCRIBE_PROMPT, "user", "assistant", "system"]
    for scene in synthetic.make_scenes(600, seed=12345):
        texts.append(scene.caption())
        texts += [f"{q} {a}" for _, q, a in scene.qa_pairs()]
        texts += [f"{u} {a}" for u, a in scene.dialogue(rng)]
    return texts


def build_processor() -> LlavaProcessor:
    size = synthetic.IMAGE_SIZE
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
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
        vision_feature_layer=-1,  # the tower is tiny: use its last layer
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model


def caption_prompt(processor: LlavaProcessor) -> str:
    messages = [{"role": "user", "content": f"{IMAGE_TOKEN}\n{synthetic.DESCRIBE_PROMPT}"}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _caption_batch(processor, scenes):
    """Tokenised caption examples; labels cover the caption and its <|im_end|>."""
    prompt = caption_prompt(processor)
    texts = [prompt + s.caption() + EOS for s in scenes]
    batch = processor(text=texts, images=[synthetic.render(s) for s in scenes], padding=True, return_tensors="pt")
    n_prompt = len(processor(text=prompt, images=[synthetic.render(scenes[0])])["input_ids"][0])
    labels = batch["input_ids"].clone()
    labels[:, :n_prompt] = -100
    labels[batch["attention_mask"] == 0] = -100
    batch["labels"] = labels
    return batch


def _text_batches(tokenizer, scenes, length: int = 32):
    """Text-only examples: generic text chunks, plus (optionally) questions about a caption."""
    ids = tokenizer(GENERIC_TEXT)["input_ids"]
    rows = [(ids[i : i + length], ids[i : i + length]) for i in range(0, len(ids) - length + 1, length // 2)]
    if TRAIN.get("text_qa"):
        for scene in scenes[:2000]:
            qtype, q, a = random.Random(hash(scene)).choice(scene.qa_pairs())
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": f"{scene.caption()}\n{q}"}], tokenize=False, add_generation_prompt=True
            )
            p_ids = tokenizer(prompt)["input_ids"]
            a_ids = tokenizer(a + EOS)["input_ids"]
            rows.append((p_ids + a_ids, [-100] * len(p_ids) + a_ids))
    width = max(len(x) for x, _ in rows)
    input_ids = torch.tensor([x + [tokenizer.pad_token_id] * (width - len(x)) for x, _ in rows])
    labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in rows])
    return input_ids, labels


def pretrain(model, processor, seed: int, log=print) -> None:
    cfg = TRAIN
    gen = torch.Generator().manual_seed(seed)
    scenes = synthetic.make_scenes(cfg["pool"], seed=10_000 + seed)  # disjoint from train/eval seeds
    t0 = time.time()
    data = _caption_batch(processor, scenes)
    text_ids, text_labels = _text_batches(processor.tokenizer, scenes)
    log(f"data {time.time() - t0:.1f}s")
    if cfg.get("vision_steps"):
        pretrain_vision(model, data["pixel_values"], scenes, gen, log)
    params = list(model.parameters())
    opt, sched = _optimizer(params, cfg["lr"], cfg["steps"], cfg["warmup"])
    model.train()
    for step in range(cfg["steps"]):
        if step % cfg["text_every"] == cfg["text_every"] - 1:
            rows = torch.randint(len(text_ids), (16,), generator=gen)
            mask = (text_ids[rows] != processor.tokenizer.pad_token_id).long()
            out = model(input_ids=text_ids[rows], attention_mask=mask, labels=text_labels[rows])
        else:
            rows = torch.randint(cfg["pool"], (cfg["batch"],), generator=gen)
            out = model(
                input_ids=data["input_ids"][rows],
                attention_mask=data["attention_mask"][rows],
                pixel_values=data["pixel_values"][rows],
                labels=data["labels"][rows],
            )
        _step(out.loss, params, opt, sched)
        if step % 50 == 0 or step == cfg["steps"] - 1:
            log(f"step {step} loss {out.loss.item():.3f} {time.time() - t0:.0f}s")


def _optimizer(params, lr: float, steps: int, warmup: int):
    """AdamW with linear warm-up and cosine decay: stable for from-scratch transformers."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    return opt, sched


def _step(loss, params, opt, sched) -> None:
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)


def pretrain_vision(model, pixel_values, scenes, gen, log=print) -> None:
    """Stage 1: teach the vision tower to see the attributes (stands in for CLIP pre-training)."""
    cfg = TRAIN
    classes = {
        "color": list(synthetic.COLORS),
        "shape": list(synthetic.SHAPES),
        "count": [1, 2, 3],
        "position": list(synthetic.POSITIONS),
    }
    targets = {a: torch.tensor([v.index(getattr(s, a)) for s in scenes]) for a, v in classes.items()}
    tower = model.model.vision_tower
    width = tower.config.hidden_size * (NUM_IMAGE_TOKENS + 1)
    heads = torch.nn.ModuleDict({a: torch.nn.Linear(width, len(v)) for a, v in classes.items()})
    params = list(tower.parameters()) + list(heads.parameters())
    opt, sched = _optimizer(params, cfg["vision_lr"], cfg["vision_steps"], cfg["warmup"])
    t0 = time.time()
    for step in range(cfg["vision_steps"]):
        rows = torch.randint(len(scenes), (cfg["batch"],), generator=gen)
        tokens = tower(pixel_values[rows], output_hidden_states=True).hidden_states[-1][:, 1:]
        # mean-pooled (translation invariant: colour, shape) + per-patch (where, how many)
        feats = torch.cat([tokens.mean(1), tokens.flatten(1)], dim=1)
        losses = {a: torch.nn.functional.cross_entropy(h(feats), targets[a][rows]) for a, h in heads.items()}
        loss = sum(losses.values())
        _step(loss, params, opt, sched)
        if step % 50 == 0 or step == cfg["vision_steps"] - 1:
            log(f"vision step {step} " + " ".join(f"{a} {v.item():.3f}" for a, v in losses.items()) + f" {time.time() - t0:.0f}s")
    return heads


@torch.no_grad()
def caption_accuracy(model, processor, n: int = 50, seed: int | None = None) -> float:
    """Greedy-caption exact match on held-out synthetic scenes (the eval split by default)."""
    scenes = synthetic.make_scenes(n, synthetic.SPLIT_SEEDS["eval"] if seed is None else seed)
    prompt = caption_prompt(processor)
    processor.tokenizer.padding_side = "left"
    batch = processor(text=[prompt] * n, images=[synthetic.render(s) for s in scenes], return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=24, do_sample=False)
    preds = processor.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return sum(p.strip() == s.caption() for p, s in zip(preds, scenes)) / n
