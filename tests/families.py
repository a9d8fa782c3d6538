"""Tiny random twins of the vision-language model families people fine-tune (a test helper, not a test file).

Each twin is a folder written locally in about a second that loads with `AutoModelForImageTextToText` and
`AutoProcessor` like its Hub checkpoint: the family's real model, processor, image processor and tokenizer
classes, its special tokens with their real spellings and BOS/EOS behaviour, and its published chat template
(the constants below, with citations). Weights are random; token ids differ from the real ones.

Usage in tests::

    from families import FAMILIES, twin             # pytest puts tests/ on sys.path

    def test_x(tmp_path_factory):
        folder = twin("gemma3", tmp_path_factory)      # built once per test session
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers

# Words a chat about pictures uses, plus each template's fixed text, so the tiny vocabularies split prose
# into a handful of tokens rather than bytes.
CORPUS = [
    "USER: ASSISTANT: User: Assistant: user assistant system model [INST] [/INST] <<SYS>> <</SYS>>",
    "You are a helpful assistant. Picture Video Describe the image briefly.",
    "What is in the picture? What color is the cat? How many dogs are there? Is it sunny?",
    "A cat is sitting on a red sofa. Two dogs play in the park. The sky is blue and it is sunny.",
    "Yes. No. It is a small house next to the river. Answer in one word. The answer is two.",
    "What is on the table? There is a cup of coffee and a book. Thank you. You are welcome.",
    "Describe the scene. A man rides a bicycle on a street with cars and trees.",
] * 3


# --- published chat templates ----------------------------------------------------------------------------
# Verbatim as the Hub JSON strings decode. Each names the Hub checkpoint and file it mirrors and the public
# copy it was read from (the Hub cannot be reached from the build machine); "confidence" says how sure we
# are the Hub file still reads like this.

# llava-hf/llava-1.5-7b-hf, chat_template.json (the same file ships with llava-hf/llava-v1.6-vicuna-7b-hf).
# Read from openvinotoolkit/openvino.genai src/cpp/src/tokenizer.cpp (chat_template_fallback_map, commented
# "llava-1.5, llava-v1.6-vicuna (chat_template.json)"); the same string appears in several training repos.
# Confidence: high. It puts no BOS in the text (the Llama tokenizer adds `<s>`) and no `</s>` after replies:
# every text part, the assistant's included, is followed by one space.
LLAVA_VICUNA = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# llava-hf/llava-v1.6-mistral-7b-hf, chat_template.json. Read from openvinotoolkit/openvino.genai
# src/cpp/src/tokenizer.cpp (commented "tiny-random-llava-next, llava-v1.6-mistral (chat_template.json)").
# Confidence: medium-high for the version that file copied; a later Hub revision may have fixed the reply end,
# which this version writes as the five characters `<\s> ` (a backslash, not the `</s>` token).
LLAVA_NEXT_MISTRAL = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\n' + message['content'][0]['text'] + '\n<</SYS>>\n\n' }}{% elif message['role'] == 'user' %}"
    "{{ '[INST] ' }}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'][0]['text'] + '<\\\\s> '}}{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# Qwen/Qwen2-VL-2B-Instruct, chat_template.json and tokenizer_config.json ("chat_template"). Read from
# openvinotoolkit/openvino.genai src/cpp/src/tokenizer.cpp (commented "Qwen2-VL-2B-Instruct (tokenizer_config.json)").
# Qwen/Qwen2.5-VL-3B-Instruct's chat_template.json carries the same string (medium-high confidence: it is what
# every Qwen2.5-VL copy we found renders; no copy named that exact file). Confidence for Qwen2-VL: high.
QWEN2_VL = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}"
)

# HuggingFaceTB/SmolVLM-256M-Instruct (and SmolVLM-Instruct), chat_template.json. Read from huggingface/transformers
# tests/models/idefics3/test_processing_idefics3.py (prepare_processor_dict) and from a port's spec that quotes the
# checkpoint's template "hex-verified" with the literal `<|im_start|>` first; confidence: high.
SMOLVLM = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# google/gemma-3-4b-it, chat_template.json (tokenizer_config.json holds the same string). Read from
# ShishirPatil/gorilla berkeley-function-call-leaderboard bfcl/model_handler/local_inference/gemma.py, which quotes
# the tokenizer_config.json entry; confidence: high. Note `| trim` on every text part and `{{ bos_token }}` first.
GEMMA3 = (
    "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n    {%- if (message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n        {%- set role = message['role'] -%}\n    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n        {%- endfor -%}\n    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n    {%- endif -%}\n    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n{%- if add_generation_prompt -%}\n    {{'<start_of_turn>model\n'}}\n{%- endif -%}\n"
)

# google/paligemma2-3b-pt-224 ships no chat template (prefix/suffix prompting: "<image>...<bos>prefix\n" + suffix);
# neither, to our knowledge, does paligemma2-3b-mix-224.
PALIGEMMA = None


@dataclass(frozen=True)
class Family:
    """A model family and the facts tests check a toolkit against."""

    name: str
    hub_id: str  # the checkpoint the twin mirrors
    build: Callable[[Path], Path]
    model_class: str
    processor_class: str
    image_processor_class: str  # as the Hub names it; without torchvision AutoImageProcessor gives its "...Pil" twin
    tokenizer_class: str  # tokenizer_config.json's; transformers 5 loads llava/llava_next ones as TokenizersBackend
    end_of_turn: tuple[str, ...]  # what the model must learn to emit after every reply (first: the usual one)
    bos: str | None  # the token every sequence must start with exactly once (None: the family has none)
    bos_added_by: str | None  # "tokenizer", "template" or "processor": who puts the BOS there
    image_token: str  # the placeholder the chat template writes for an image
    chat_template: str | None
    # token_type_ids mark image (Gemma 3) or prefix (PaliGemma) tokens for bidirectional attention; without them
    # the model still runs, silently attending differently.
    needs_token_type_ids: bool = False
    extra_inputs: tuple[str, ...] = ()  # image-related keys the processor returns besides pixel_values
    needs_torchvision: bool = False  # its processor cannot be built or loaded without torchvision
    image_size: tuple[int, int] = (40, 30)  # (width, height) of the test image: not square, a few tens of tokens
    notes: str = ""


# --- tokenizers -------------------------------------------------------------------------------------------------


def _train_bpe(pre_tokenizer, vocab_size: int, byte_level: bool) -> tuple[dict, list]:
    """Vocabulary and merges of a BPE trained on CORPUS (the family's own tokenizer class is built from them)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if byte_level else [],
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


def _sentencepiece_like(first: list[str], vocab_size: int = 300) -> tuple[dict, list]:
    """Llama/Gemma style: '▁' marks spaces, byte fallback tokens <0x00>..<0xFF> for anything unseen."""
    trained, merges = _train_bpe(pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"), vocab_size, False)
    vocab = {token: i for i, token in enumerate(first)}
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    for token in sorted(trained, key=trained.get):
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def _byte_level(first: list[str], vocab_size: int = 400) -> tuple[dict, list]:
    """GPT-2/Qwen style byte-level BPE."""
    trained, merges = _train_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False), vocab_size, True)
    vocab = {token: i for i, token in enumerate(first)}
    for token in sorted(trained, key=trained.get):
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def _add_special(tokenizer, tokens: list[str]) -> None:
    """Make tokens atomic special tokens (kept whole, skipped by decode(skip_special_tokens=True))."""
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in tokens], special_tokens=True)


def _llama_tokenizer(extra: list[str]):
    from transformers import LlamaTokenizer

    vocab, merges = _sentencepiece_like(["<unk>", "<s>", "</s>"])
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False,
                               pad_token="<pad>", model_max_length=4096)
    _add_special(tokenizer, ["<unk>", "<s>", "</s>", *extra])
    return tokenizer


# --- models -----------------------------------------------------------------------------------------------------

# Decoder widths of 64: bitsandbytes' CPU kernel for 4-bit inference needs in_features >= its 64-wide blocks.
TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "max_position_embeddings": 1024}
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


def _ids(tokenizer, **tokens) -> dict:
    return {name: tokenizer.convert_tokens_to_ids(token) for name, token in tokens.items()}


def _save(folder: Path, model, processor, generation: dict) -> Path:
    model.generation_config.update(**generation)
    model.generation_config.max_new_tokens = 8
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _text_ids(tokenizer, bos: str | None, eos: str, pad: str) -> dict:
    ids = _ids(tokenizer, eos_token_id=eos, pad_token_id=pad)
    ids["bos_token_id"] = tokenizer.convert_tokens_to_ids(bos) if bos else None
    return ids


def build_llava(folder: Path) -> Path:
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    torch.manual_seed(0)
    tokenizer = _llama_tokenizer(["<image>", "<pad>"])
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA_VICUNA)
    ids = _text_ids(tokenizer, "<s>", "</s>", "<pad>")
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**VISION, image_size=32, patch_size=8, projection_dim=32),
        text_config=LlamaConfig(vocab_size=len(tokenizer), **TEXT, **ids),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_seq_length=16,
        vision_feature_select_strategy="default", vision_feature_layer=-2, **ids,
    )
    return _save(folder, LlavaForConditionalGeneration(config), processor, ids)


def _build_llava_next(folder: Path, text_kind: str) -> Path:
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
        MistralConfig,
    )

    torch.manual_seed(0)
    tokenizer = _llama_tokenizer(["<image>", "<pad>"])
    pinpoints = [[16, 32], [32, 16], [32, 32]]  # the real ones are 336-px multiples; 16 px tiles of 2x2 patches
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                                                 image_grid_pinpoints=pinpoints)
    template = LLAVA_NEXT_MISTRAL if text_kind == "mistral" else LLAVA_VICUNA
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=template)
    ids = _text_ids(tokenizer, "<s>", "</s>", "<pad>")
    text_config = (MistralConfig(vocab_size=len(tokenizer), **TEXT, sliding_window=None, **ids)
                   if text_kind == "mistral" else LlamaConfig(vocab_size=len(tokenizer), **TEXT, **ids))
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**VISION, image_size=16, patch_size=8, projection_dim=32),
        text_config=text_config, image_grid_pinpoints=pinpoints,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_seq_length=4,
        vision_feature_select_strategy="default", vision_feature_layer=-2, **ids,
    )
    return _save(folder, LlavaNextForConditionalGeneration(config), processor, ids)


def build_llava_next_mistral(folder: Path) -> Path:
    return _build_llava_next(folder, "mistral")


def build_llava_next_vicuna(folder: Path) -> Path:
    return _build_llava_next(folder, "vicuna")


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]


def _qwen_tokenizer():
    from transformers import Qwen2Tokenizer

    vocab, merges = _byte_level([])
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                               unk_token=None, bos_token=None, extra_special_tokens=QWEN_SPECIALS[1:],
                               model_max_length=32768, errors="replace")
    _add_special(tokenizer, QWEN_SPECIALS)
    return tokenizer


def _build_qwen(folder: Path, version: str) -> Path:
    """Qwen2-VL / Qwen2.5-VL: the processor files are written without constructing the processor.

    transformers 5.24's Qwen2VLProcessor cannot be constructed, saved or loaded without torchvision (its
    video processor is required and the check for it fails), so the folder holds what the Hub repo holds:
    tokenizer files, preprocessor_config.json (the image processor, naming Qwen2VLProcessor) and
    chat_template.json. AutoProcessor loads it wherever torchvision is installed.
    """
    from transformers import Qwen2VLImageProcessorPil

    torch.manual_seed(0)
    tokenizer = _qwen_tokenizer()
    ids = {"bos_token_id": None, **_ids(tokenizer, eos_token_id="<|im_end|>", pad_token_id="<|endoftext|>")}
    special = _ids(tokenizer, image_token_id="<|image_pad|>", video_token_id="<|video_pad|>",
                   vision_start_token_id="<|vision_start|>", vision_end_token_id="<|vision_end|>")
    text = {**TEXT, "vocab_size": len(tokenizer), "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]},
            **ids}
    if version == "2":
        from transformers import Qwen2VLConfig as Config
        from transformers import Qwen2VLForConditionalGeneration as Model

        vision = {"depth": 1, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2, "patch_size": 14,
                  "spatial_merge_size": 2, "temporal_patch_size": 2}
    else:
        from transformers import Qwen2_5_VLConfig as Config
        from transformers import Qwen2_5_VLForConditionalGeneration as Model

        vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
                  "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 56,
                  "fullatt_block_indexes": [1]}
    config = Config(text_config=text, vision_config=vision, **special, **ids)
    model = Model(config)
    # 56x56 to 112x112 pixels: 4 to 16 image tokens after the 2x2 merge (the real ones allow up to 12.8M pixels).
    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14,
                                               merge_size=2, temporal_patch_size=2)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    preprocessor = json.loads((folder / "preprocessor_config.json").read_text())
    processor_class = "Qwen2VLProcessor" if version == "2" else "Qwen2_5_VLProcessor"
    preprocessor.update(image_processor_type="Qwen2VLImageProcessor", processor_class=processor_class)
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": QWEN2_VL}, indent=2) + "\n")
    model.generation_config.update(eos_token_id=[ids["eos_token_id"], ids["pad_token_id"]],
                                   pad_token_id=ids["pad_token_id"], bos_token_id=None, max_new_tokens=8)
    model.save_pretrained(folder)
    return folder


def build_qwen2_vl(folder: Path) -> Path:
    return _build_qwen(folder, "2")


def build_qwen2_5_vl(folder: Path) -> Path:
    return _build_qwen(folder, "2.5")


def build_smolvlm(folder: Path) -> Path:
    from transformers import (
        GPT2Tokenizer,
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        LlamaConfig,
    )

    torch.manual_seed(0)
    first = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    image_tokens = ["<fake_token_around_image>", "<image>", "<global-img>",
                    *[f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]]
    vocab, merges = _byte_level(first)
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=merges, bos_token="<|im_start|>", eos_token="<end_of_utterance>",
                              pad_token="<|im_end|>", unk_token="<|endoftext|>", add_prefix_space=False,
                              model_max_length=8192)
    _add_special(tokenizer, [*first, *image_tokens, "<end_of_utterance>"])
    # Splitting on, but tiny: images up to 64 px become up to 2x2 tiles of 32 px plus the 32 px global view.
    image_processor = Idefics3ImageProcessorPil(do_image_splitting=True, size={"longest_edge": 64},
                                                max_image_size={"longest_edge": 32})
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4,
                                  chat_template=SMOLVLM)
    ids = _text_ids(tokenizer, "<|im_start|>", "<end_of_utterance>", "<|im_end|>")
    config = Idefics3Config(
        vision_config={**VISION, "image_size": 32, "patch_size": 8},
        text_config=LlamaConfig(vocab_size=len(tokenizer), **TEXT, **ids),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), scale_factor=2, **ids,
    )
    return _save(folder, Idefics3ForConditionalGeneration(config), processor, ids)


GEMMA_FIRST = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]


def _gemma_tokenizer(extra: list[str], named: dict | None = None, **kwargs):
    from transformers import GemmaTokenizer

    vocab, merges = _sentencepiece_like(GEMMA_FIRST + extra)
    # Gemma has "\n" and "\n\n" as tokens (its processors put "\n\n" around every image).
    vocab.setdefault("\n", len(vocab))
    vocab.setdefault("\n\n", len(vocab))
    merges = [("\n", "\n"), *merges]
    tokenizer = GemmaTokenizer(vocab=vocab, merges=merges, extra_special_tokens=named or None,
                               model_max_length=8192, **kwargs)
    _add_special(tokenizer, GEMMA_FIRST + extra)
    return tokenizer


def build_gemma3(folder: Path) -> Path:
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    torch.manual_seed(0)
    named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tokenizer = _gemma_tokenizer(["<start_of_turn>", "<end_of_turn>", *named.values()], named,
                                 add_bos_token=True, add_eos_token=False)
    image_processor = Gemma3ImageProcessorPil(size={"height": 32, "width": 32}, image_seq_length=4)
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                chat_template=GEMMA3, image_seq_length=4)
    ids = _text_ids(tokenizer, "<bos>", "<eos>", "<pad>")
    text = Gemma3TextConfig(vocab_size=len(tokenizer), **TEXT, head_dim=32, query_pre_attn_scalar=32,
                            sliding_window=16, layer_types=["sliding_attention", "full_attention"], **ids)
    config = Gemma3Config(
        text_config=text, vision_config=SiglipVisionConfig(**VISION, image_size=32, patch_size=8),
        mm_tokens_per_image=4, **_ids(tokenizer, boi_token_index="<start_of_image>", eoi_token_index="<end_of_image>",
                                      image_token_index="<image_soft_token>"),
    )
    # gemma-3-4b-it's generation_config stops on <eos> and <end_of_turn>.
    generation = {**ids, "eos_token_id": [ids["eos_token_id"], tokenizer.convert_tokens_to_ids("<end_of_turn>")]}
    return _save(folder, Gemma3ForConditionalGeneration(config), processor, generation)


def build_paligemma2(folder: Path) -> Path:
    from transformers import (
        Gemma2Config,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessorPil,
        SiglipVisionConfig,
    )

    torch.manual_seed(0)
    tokenizer = _gemma_tokenizer(["<image>"], {"image_token": "<image>"}, add_bos_token=True, add_eos_token=False)
    image_processor = SiglipImageProcessorPil(size={"height": 32, "width": 32}, image_seq_length=16,
                                              image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)  # adds <loc..>, <seg..>
    ids = _text_ids(tokenizer, "<bos>", "<eos>", "<pad>")
    text = Gemma2Config(vocab_size=len(tokenizer), **TEXT, head_dim=32, query_pre_attn_scalar=32, sliding_window=16,
                        **ids)
    config = PaliGemmaConfig(
        text_config=text, vision_config=SiglipVisionConfig(**VISION, image_size=32, patch_size=8, projection_dim=64),
        projection_dim=64, hidden_size=64, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vocab_size=len(tokenizer), **ids,
    )
    return _save(folder, PaliGemmaForConditionalGeneration(config), processor, ids)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family("llava-1.5", "llava-hf/llava-1.5-7b-hf", build_llava, "LlavaForConditionalGeneration",
               "LlavaProcessor", "CLIPImageProcessor", "LlamaTokenizer", ("</s>",), "<s>", "tokenizer",
               "<image>", LLAVA_VICUNA,
               notes="template ends replies with a space, not </s>; the Llama tokenizer adds <s>"),
        Family("llava-next-mistral", "llava-hf/llava-v1.6-mistral-7b-hf", build_llava_next_mistral,
               "LlavaNextForConditionalGeneration", "LlavaNextProcessor", "LlavaNextImageProcessor",
               "LlamaTokenizer", ("</s>",), "<s>", "tokenizer", "<image>", LLAVA_NEXT_MISTRAL,
               extra_inputs=("image_sizes",), notes="template ends replies with the literal text '<\\s> '"),
        Family("llava-next-vicuna", "llava-hf/llava-v1.6-vicuna-7b-hf", build_llava_next_vicuna,
               "LlavaNextForConditionalGeneration", "LlavaNextProcessor", "LlavaNextImageProcessor",
               "LlamaTokenizer", ("</s>",), "<s>", "tokenizer", "<image>", LLAVA_VICUNA,
               extra_inputs=("image_sizes",)),
        Family("qwen2-vl", "Qwen/Qwen2-VL-2B-Instruct", build_qwen2_vl, "Qwen2VLForConditionalGeneration",
               "Qwen2VLProcessor", "Qwen2VLImageProcessor", "Qwen2Tokenizer", ("<|im_end|>",), None, None,
               "<|image_pad|>", QWEN2_VL, extra_inputs=("image_grid_thw", "mm_token_type_ids"),
               needs_torchvision=True, image_size=(64, 48),
               notes="forward raises without mm_token_type_ids (1 on image tokens) when pixels are given"),
        Family("qwen2.5-vl", "Qwen/Qwen2.5-VL-3B-Instruct", build_qwen2_5_vl, "Qwen2_5_VLForConditionalGeneration",
               "Qwen2_5_VLProcessor", "Qwen2VLImageProcessor", "Qwen2Tokenizer", ("<|im_end|>",), None, None,
               "<|image_pad|>", QWEN2_VL, extra_inputs=("image_grid_thw", "mm_token_type_ids"),
               needs_torchvision=True, image_size=(64, 48),
               notes="forward runs without mm_token_type_ids but its loss differs: pass them"),
        Family("smolvlm", "HuggingFaceTB/SmolVLM-256M-Instruct", build_smolvlm, "Idefics3ForConditionalGeneration",
               "Idefics3Processor", "Idefics3ImageProcessor", "GPT2Tokenizer", ("<end_of_utterance>",),
               "<|im_start|>", "template", "<image>", SMOLVLM, extra_inputs=("pixel_attention_mask",),
               image_size=(64, 48)),
        Family("gemma3", "google/gemma-3-4b-it", build_gemma3, "Gemma3ForConditionalGeneration", "Gemma3Processor",
               "Gemma3ImageProcessor", "GemmaTokenizer", ("<end_of_turn>", "<eos>"), "<bos>", "template",
               "<start_of_image>", GEMMA3, needs_token_type_ids=True, extra_inputs=("token_type_ids",),
               notes="template writes <bos> and the tokenizer adds another unless add_special_tokens=False"),
        Family("paligemma2", "google/paligemma2-3b-pt-224", build_paligemma2, "PaliGemmaForConditionalGeneration",
               "PaliGemmaProcessor", "SiglipImageProcessor", "GemmaTokenizer", ("<eos>",), "<bos>", "processor",
               "<image>", PALIGEMMA, needs_token_type_ids=True, extra_inputs=("token_type_ids",),
               notes="no chat template: prefix/suffix prompting, the processor adds <bos>, '\\n' and <eos>"),
    ]
}


def twin(name: str, tmp_path_factory) -> Path:
    """The family's twin folder, built once per pytest session (pass pytest's tmp_path_factory)."""
    cache = tmp_path_factory.getbasetemp() / "families"
    folder = cache / name
    if not (folder / "config.json").exists():
        FAMILIES[name].build(folder)
    return folder
