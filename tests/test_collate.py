"""Labels cover exactly the assistant replies (and their end-of-turn token), for two chat templates."""

import copy

import pytest
import torch
from labels import supervised_runs

from finetune.data.collate import Collator
from finetune.data.encode import IGNORE, ChatEncoder, TooLong
from finetune.data.formats import row_to_examples

# A second, structurally different template (Gemma-style turns, "model" role, no system role,
# image parts rendered before the text): labels must still be exactly the replies.
GEMMA_STYLE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% set role = 'model' if m['role'] == 'assistant' else 'user' %}"
    "<start_of_turn>{{ role }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>{% else %}{{ p['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

CONVERSATION = {
    "image": "unused.png",
    "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the circle?"},
        {"from": "gpt", "value": "It is red."},
        {"from": "human", "value": "How many are there?"},
        {"from": "gpt", "value": "Two circles, side by side."},
    ],
}


@pytest.fixture(params=["chatml", "gemma-style"])
def encoder(request, processor):
    processor = copy.deepcopy(processor)
    end_of_turn = "<|im_end|>"
    if request.param == "gemma-style":
        processor.tokenizer.add_special_tokens(
            {"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]}, replace_extra_special_tokens=False
        )
        processor.chat_template = GEMMA_STYLE
        processor.tokenizer.chat_template = GEMMA_STYLE
        end_of_turn = "<end_of_turn>"
    enc = ChatEncoder(processor, max_length=512)
    enc.end_of_turn = end_of_turn
    return enc


def supervised_text(features, tokenizer):
    """Decode each contiguous run of supervised tokens."""
    return [tokenizer.decode(run) for run in supervised_runs(features)]


def test_only_assistant_replies_are_supervised(encoder, shapes_image):
    example = row_to_examples(CONVERSATION, system_prompt="You are terse.")[0]
    features = encoder.encode(example, images=[shapes_image])
    eot = encoder.end_of_turn
    assert supervised_text(features, encoder.tokenizer) == [f"It is red.{eot}", f"Two circles, side by side.{eot}"]
    # The image was expanded to the processor's image tokens, none of them supervised.
    image_positions = [i for i, t in enumerate(features["input_ids"]) if t == encoder.image_token_id]
    assert len(image_positions) > 1
    assert all(features["labels"][i] == IGNORE for i in image_positions)


def test_text_only_rows_and_padding(processor, shapes_image):
    enc = ChatEncoder(processor, max_length=512)
    with_image = enc.encode(row_to_examples(CONVERSATION)[0], images=[shapes_image])
    text_only = enc.encode(row_to_examples({"conversations": CONVERSATION["conversations"][2:]})[0])
    assert "pixel_values" not in text_only
    batch = Collator(processor.tokenizer.pad_token_id)([text_only, with_image])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["pixel_values"].shape[0] == 1
    short = len(text_only["input_ids"])
    assert (batch["labels"][0, short:] == IGNORE).all() and (batch["attention_mask"][0, short:] == 0).all()
    assert batch["attention_mask"][1].all()


def test_max_length_never_cuts_image_tokens(processor, shapes_image):
    example = row_to_examples(CONVERSATION)[0]
    full = ChatEncoder(processor, max_length=1024).encode(example, images=[shapes_image])
    last_image = max(i for i, t in enumerate(full["input_ids"]) if t == processor.tokenizer.convert_tokens_to_ids(
        "<image>"))
    first_reply = next(i for i, label in enumerate(full["labels"]) if label != IGNORE)
    # Room for the image and part of the first reply: truncated, image tokens intact.
    cut = ChatEncoder(processor, max_length=first_reply + 3).encode(example, images=[shapes_image])
    assert len(cut["input_ids"]) == first_reply + 3 < len(full["input_ids"])
    assert cut["input_ids"].count(processor.tokenizer.convert_tokens_to_ids("<image>")) == full["input_ids"].count(
        processor.tokenizer.convert_tokens_to_ids("<image>"))
    assert any(label != IGNORE for label in cut["labels"])
    # Not even the image fits: the row is refused rather than cut through its image tokens.
    with pytest.raises(TooLong):
        ChatEncoder(processor, max_length=last_image).encode(example, images=[shapes_image])


def test_the_model_accepts_a_batch(tiny_path, processor, shapes_image):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_path)
    enc = ChatEncoder(processor, max_length=512)
    features = [enc.encode(row_to_examples(CONVERSATION)[0], images=[shapes_image]),
                enc.encode(row_to_examples({"question": "Hi?", "answer": "Hello."})[0])]
    batch = Collator(processor.tokenizer.pad_token_id)(features)
    with torch.no_grad():
        loss = model(**batch).loss
    assert torch.isfinite(loss)
