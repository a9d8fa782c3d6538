"""Each family twin builds, loads through the Auto classes with the family's real classes, renders its published
chat template, and runs one forward pass (finite loss) and one generate() call."""

import importlib.util
import json
import math

import pytest
import torch
from families import FAMILIES, twin
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
)

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
NAMES = list(FAMILIES)


def _image(family):
    return Image.new("RGB", family.image_size, (200, 40, 40))


def _chat(family):
    """One user turn (image + question) and one reply, as content parts every template accepts."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is on the sofa?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A red cat."}]}]


def _processor(family, folder):
    if family.needs_torchvision and not HAS_TORCHVISION:
        pytest.skip("transformers 5 builds Qwen2-VL processors only with torchvision (its video processor)")
    return AutoProcessor.from_pretrained(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {name: twin(name, tmp_path_factory) for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_twin_has_the_family_classes_and_tokens(name, folders):
    family, folder = FAMILIES[name], folders[name]
    model = AutoModelForImageTextToText.from_pretrained(folder)
    assert type(model).__name__ == family.model_class
    assert sum(p.numel() for p in model.parameters()) < 300_000
    # Without torchvision the Auto class picks the PIL backend, named like the Hub class plus "Pil".
    assert type(AutoImageProcessor.from_pretrained(folder)).__name__.removesuffix("Pil") == family.image_processor_class
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == family.tokenizer_class
    tokenizer = AutoTokenizer.from_pretrained(folder)
    # Every end-of-turn token is one atomic token, and generation stops on the first one.
    for token in family.end_of_turn:
        assert tokenizer.convert_ids_to_tokens(tokenizer.convert_tokens_to_ids(token)) == token
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [tokenizer.convert_tokens_to_ids(token)]
    stops = model.generation_config.eos_token_id
    stops = stops if isinstance(stops, list) else [stops]
    assert tokenizer.convert_tokens_to_ids(family.end_of_turn[0]) in stops
    # BOS: added by the tokenizer only where the family's tokenizer adds it.
    first = tokenizer("What is it?")["input_ids"][0]
    if family.bos_added_by == "tokenizer":
        assert first == tokenizer.convert_tokens_to_ids(family.bos)
    if family.bos is None:
        assert tokenizer.bos_token is None


@pytest.mark.parametrize("name", NAMES)
def test_twin_renders_its_published_template(name, folders):
    family, folder = FAMILIES[name], folders[name]
    processor = _processor(family, folder)
    assert type(processor).__name__ == family.processor_class
    assert type(processor.tokenizer).__name__ in (family.tokenizer_class, "TokenizersBackend")
    if family.chat_template is None:
        assert processor.chat_template is None
        return
    assert processor.chat_template == family.chat_template
    text = processor.apply_chat_template(_chat(family), tokenize=False)
    assert text.count(family.image_token) == 1 and "A red cat." in text
    if family.bos_added_by == "template":
        assert text.startswith(family.bos)
    prompt = processor.apply_chat_template(_chat(family)[:1], tokenize=False, add_generation_prompt=True)
    assert text.startswith(prompt.rstrip())


def _inputs(family, processor, image):
    if family.chat_template is None:  # PaliGemma: prefix + suffix, the processor writes the labels
        return processor(text="<image>what is on the sofa?", images=image, suffix="a red cat", return_tensors="pt")
    text = processor.apply_chat_template(_chat(family), tokenize=False)
    # Templates that write the BOS themselves must not get a second one from the tokenizer.
    inputs = processor(text=text, images=image, add_special_tokens=family.bos_added_by != "template",
                       return_tensors="pt")
    inputs["labels"] = inputs["input_ids"].clone()
    return inputs


def _qwen_inputs_without_processor(folder, image):
    """Qwen2-VL inputs from the tokenizer and image processor alone (what the processor does: one <|image_pad|>
    per merged 2x2 patch group), so the model is exercised where the processor cannot be built."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    image_processor = AutoImageProcessor.from_pretrained(folder)
    pixels = image_processor(images=[image], return_tensors="pt")
    count = int(pixels["image_grid_thw"][0].prod()) // image_processor.merge_size**2
    text = ("<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * count
            + "<|vision_end|>What is on the sofa?<|im_end|>\n<|im_start|>assistant\nA red cat.<|im_end|>\n")
    inputs = {**tokenizer(text, return_tensors="pt"), **pixels}
    # 1 marks image tokens: transformers 5.24's Qwen2-VL needs it for its 3-D (M-RoPE) positions.
    inputs["mm_token_type_ids"] = (inputs["input_ids"] == tokenizer.convert_tokens_to_ids("<|image_pad|>")).long()
    inputs["labels"] = inputs["input_ids"].clone()
    return inputs


@pytest.mark.parametrize("name", NAMES)
def test_twin_forward_and_generate(name, folders):
    family, folder = FAMILIES[name], folders[name]
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    image = _image(family)
    if family.needs_torchvision and not HAS_TORCHVISION:
        inputs = _qwen_inputs_without_processor(folder, image)
    else:
        inputs = _inputs(family, _processor(family, folder), image)
    for key in family.extra_inputs:
        assert key in inputs, f"{key} missing from {sorted(inputs)}"
    with torch.no_grad():
        loss = model(**inputs).loss
    assert math.isfinite(float(loss)) and float(loss) > 0
    inputs.pop("labels")
    if family.chat_template is None:  # generate from the prefix alone
        inputs = _processor(family, folder)(text="<image>what is on the sofa?", images=image, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
