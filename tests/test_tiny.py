"""The embedded tiny-llava checkpoint: loads like a Hub download, real tokenizer and template, a real captioner."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from finetune.demo import synthetic, tiny


@pytest.fixture(scope="module")
def cache():
    # The cache every other test uses ($FINETUNE_CACHE in CI): the 1-2 minute build happens once per run.
    return synthetic.cache_dir()


@pytest.fixture(scope="module")
def folder(cache, tiny_path):
    return tiny_path


@pytest.fixture(scope="module")
def model(folder):
    return AutoModelForImageTextToText.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def processor(folder):
    return AutoProcessor.from_pretrained(folder)


@pytest.fixture(scope="module")
def tokenizer(folder):
    return AutoTokenizer.from_pretrained(folder)


def test_the_folder_is_cached_under_finetune_cache(cache, folder):
    assert folder.is_relative_to(cache) and folder.name.startswith("tiny-llava-")
    assert tiny.tiny_llava_path() == folder
    assert (folder / "model.safetensors").is_file() and not (folder / "pytorch_model.bin").exists()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_loads_with_the_auto_classes(model, processor, tokenizer):
    assert isinstance(model, LlavaForConditionalGeneration)
    assert isinstance(processor, LlavaProcessor)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert model.config.image_token_id == image_id == processor.image_token_id
    assert model.config.vision_feature_select_strategy == processor.vision_feature_select_strategy == "default"
    assert model.config.text_config.vocab_size == len(tokenizer)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id
    assert sum(p.numel() for p in model.parameters()) < 2_000_000


def test_image_placeholder_expands_to_one_token_per_patch(model, processor):
    image = synthetic.render(synthetic.make_scenes(1, seed=0)[0])
    batch = processor(text=["<image>\nDescribe the image."], images=[image], return_tensors="pt")
    assert tiny.NUM_IMAGE_TOKENS == (64 // 8) ** 2 == 64
    assert (batch["input_ids"] == processor.image_token_id).sum().item() == tiny.NUM_IMAGE_TOKENS
    assert batch["pixel_values"].shape == (1, 3, 64, 64)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (*batch["input_ids"].shape, model.config.text_config.vocab_size)


CONVERSATION = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "<image>\nWhat color are the shapes?"},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "How many shapes are there?"},
    {"role": "assistant", "content": "2"},
]
AS_PARTS = [
    {"role": "system", "content": [{"type": "text", "text": "You are helpful."}]},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color are the shapes?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    {"role": "user", "content": [{"type": "text", "text": "How many shapes are there?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "2"}]},
]
RENDERED = (
    "<|im_start|>system\nYou are helpful.<|im_end|>\n"
    "<|im_start|>user\n<image>\nWhat color are the shapes?<|im_end|>\n"
    "<|im_start|>assistant\nred<|im_end|>\n"
    "<|im_start|>user\nHow many shapes are there?<|im_end|>\n"
    "<|im_start|>assistant\n2<|im_end|>\n"
)


def test_chat_template_renders_strings_and_parts_alike(processor, tokenizer):
    for render in (processor.apply_chat_template, tokenizer.apply_chat_template):
        assert render(CONVERSATION, tokenize=False) == RENDERED
        assert render(AS_PARTS, tokenize=False) == RENDERED
    prompt = tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_chat_template_has_the_prefix_property(tokenizer):
    """Prompt (with generation prompt) + answer = the full rendering, as text and as token ids."""
    for k, message in enumerate(CONVERSATION):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(CONVERSATION[:k], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(CONVERSATION[: k + 1], tokenize=False)
        assert full == prompt + message["content"] + "<|im_end|>\n"
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        assert full_ids[: len(prompt_ids)] == prompt_ids
        assert full_ids[len(prompt_ids)] != tokenizer.eos_token_id


def test_special_tokens(tokenizer):
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<image>", "<|im_start|>", "<|im_end|>", "<|pad|>")}
    assert len(set(ids.values())) == 4
    assert tokenizer.unk_token is None
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|pad|>"
    encoded = tokenizer("<|im_start|>user\n<image>\nhi<|im_end|>", add_special_tokens=False)["input_ids"]
    assert [ids["<|im_start|>"], ids["<image>"], ids["<|im_end|>"]] == [encoded[0], encoded[3], encoded[-1]]


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_tokenizer_round_trips_any_text(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_tokenizer_knows_the_synthetic_words_as_whole_tokens(tokenizer):
    """The same word is the same token at the start of an answer and inside a caption."""
    for word in (*synthetic.COLORS, *synthetic.SHAPES, *synthetic.POSITIONS, "1", "2", "3"):
        assert len(tokenizer.tokenize(word)) == 1
        assert tokenizer.tokenize("\n" + word)[1:] == tokenizer.tokenize(word)


def test_the_base_captions_held_out_images(model, processor):
    # Measured: 0.96 on these 50 eval-split scenes (0.945 on 200); a random model gets 0.
    assert tiny.caption_accuracy(model, processor, n=50) >= 0.8
    torch.manual_seed(0)
    untrained = tiny.build_model(processor.tokenizer).eval()
    assert tiny.caption_accuracy(untrained, processor, n=50) <= 0.05


def test_the_base_does_not_answer_questions_yet(model, processor):
    """It is a captioner: VQA is what the LoRA fine-tune is for (measured accuracy 0.005)."""
    scenes = synthetic.make_scenes(25, seed=synthetic.SPLIT_SEEDS["eval"])
    images = [synthetic.render(scene) for scene in scenes]
    correct = 0
    for qtype, question in synthetic.QUESTIONS.items():  # one question per batch: equal lengths, no padding
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": f"<image>\n{question}"}], tokenize=False, add_generation_prompt=True
        )
        batch = processor(text=[prompt] * len(scenes), images=images, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=8, do_sample=False)
        answers = processor.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        correct += sum(a.strip() == scene.answers()[qtype] for a, scene in zip(answers, scenes))
    assert correct / (4 * len(scenes)) <= 0.2


def test_the_build_is_deterministic(monkeypatch):
    assert tiny.build_tokenizer().backend_tokenizer.to_str() == tiny.build_tokenizer().backend_tokenizer.to_str()
    short = {**tiny.TRAIN, "pool": 24, "batch": 4, "vision_steps": 3, "steps": 5, "warmup": 2}
    monkeypatch.setattr(tiny, "TRAIN", short)
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        processor = tiny.build_processor()
        model = tiny.build_model(processor.tokenizer)
        tiny.pretrain(model, processor, seed=0)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert json.loads(processor.tokenizer.backend_tokenizer.to_str())["model"]["type"] == "BPE"
