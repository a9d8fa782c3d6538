"""The benchmark fixture: a ~4.3M-parameter LLaVA-shaped model (random weights) and 256 mixed-length multimodal
samples, written to one folder. Deterministic: the same seed writes the same files.

The model reuses the embedded tiny-llava's tokenizer, processor and chat template (finetune.demo.tiny) with a
wider, deeper decoder and vision tower, so the shapes are LLaVA's (CLIP tower, 2-layer MLP projector, Llama
decoder) at a size a 2-core CPU trains in seconds.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from finetune.demo import synthetic
from finetune.demo.tiny import (
    GENERIC_TEXT,
    IMAGE_TOKEN,
    NUM_IMAGE_TOKENS,
    PATCH_SIZE,
    build_processor,
)

VISION = {"hidden": 128, "layers": 2, "heads": 4, "intermediate": 512}
TEXT = {"hidden": 256, "layers": 4, "heads": 4, "intermediate": 768}
SAMPLES = 256
MAX_WORDS = 80  # answers are 1..80 words
MAX_LENGTH = 1024  # longer than any sample: neither trainer truncates
FIXTURE_VERSION = "v1"  # bump when the files change, so a cached folder is rebuilt


def build_model(tokenizer) -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(hidden_size=VISION["hidden"], intermediate_size=VISION["intermediate"],
                              num_hidden_layers=VISION["layers"], num_attention_heads=VISION["heads"],
                              image_size=synthetic.IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=VISION["hidden"])
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=TEXT["hidden"], intermediate_size=TEXT["intermediate"],
                       num_hidden_layers=TEXT["layers"], num_attention_heads=TEXT["heads"],
                       num_key_value_heads=TEXT["heads"], max_position_embeddings=MAX_LENGTH, bos_token_id=None,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         image_seq_length=NUM_IMAGE_TOKENS, vision_feature_select_strategy="default",
                         vision_feature_layer=-1)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def samples(n: int, seed: int) -> list[dict]:
    """`messages` rows (HF content parts) with one image each: 1-3 turns, answers of 1-80 words."""
    rng = random.Random(seed)
    words = " ".join(GENERIC_TEXT.split()).replace(".", "").replace(",", "").split()
    rows = []
    for i, scene in enumerate(synthetic.make_scenes(n, seed)):
        questions = [q for _, q, _ in scene.qa_pairs()] + [synthetic.DESCRIBE_PROMPT]
        messages = []
        for turn in range(rng.randint(1, 3)):
            text = {"type": "text", "text": rng.choice(questions)}
            messages.append({"role": "user", "content": [{"type": "image"}, text] if turn == 0 else [text]})
            answer = " ".join(rng.choice(words) for _ in range(rng.randint(1, MAX_WORDS)))
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer.capitalize() + "."}]})
        rows.append({"messages": messages, "images": [f"images/{i:04d}.png"], "scene": scene})
    return rows


def build(folder: str | Path, seed: int = 0) -> Path:
    """Write model/ (weights + processor) and data/train.jsonl + data/images/ under `folder`; reused when present."""
    folder = Path(folder)
    done = folder / f".done-{FIXTURE_VERSION}-{seed}"
    if done.is_file():
        return folder
    torch.manual_seed(seed)
    processor = build_processor()
    model = build_model(processor.tokenizer)
    model.save_pretrained(folder / "model")
    processor.save_pretrained(folder / "model")
    data = folder / "data"
    (data / "images").mkdir(parents=True, exist_ok=True)
    with open(data / "train.jsonl", "w") as out:
        for row in samples(SAMPLES, seed):
            synthetic.render(row.pop("scene")).save(data / row["images"][0])
            out.write(json.dumps(row) + "\n")
    done.touch()
    return folder


def parameter_count(folder: str | Path) -> int:
    config = LlavaConfig.from_pretrained(Path(folder) / "model")
    with torch.device("meta"):
        return sum(p.numel() for p in LlavaForConditionalGeneration(config).parameters())


if __name__ == "__main__":
    import sys

    out = build(sys.argv[1] if len(sys.argv) > 1 else "/tmp/vs-trl-fixture")
    print(out, f"{parameter_count(out):,} parameters")
