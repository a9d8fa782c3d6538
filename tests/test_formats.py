"""Content-part shapes and row-level columns that other tools write (OpenAI, Hugging Face, LLaMA-Factory v1,
lmms-finetune) become the same canonical Example as our own formats."""

import json

import datasets
import pytest

from finetune.config import DataConfig
from finetune.data.dataset import load_examples
from finetune.data.formats import row_to_examples
from finetune.errors import DataError

WANT = [{"role": "user", "content": "<image>What colour is it?"}, {"role": "assistant", "content": "red"}]


def parts_row(image_part, text_key="text", text_type="text", reply_type="text"):
    return {"messages": [{"role": "user", "content": [image_part, {"type": text_type, text_key: "What colour is it?"}]},
                         {"role": "assistant", "content": [{"type": reply_type, text_key: "red"}]}]}


@pytest.mark.parametrize("image_part, text_key, text_type, reply_type", [
    ({"type": "image_url", "image_url": {"url": "a.png", "detail": "low"}}, "text", "text", "text"),  # OpenAI chat
    ({"type": "image_url", "image_url": "a.png"}, "text", "text", "text"),  # a bare string image_url
    ({"type": "input_image", "image_url": "a.png"}, "text", "input_text", "output_text"),  # OpenAI Responses
    ({"type": "image_url", "value": "a.png"}, "value", "text", "text"),  # LLaMA-Factory v1
    ({"type": "image", "image": "a.png"}, "text", "text", "text"),  # Hugging Face chat templates
    ({"type": "image", "path": "a.png"}, "text", "text", "text"),
    ({"type": "image", "url": "a.png"}, "text", "text", "text"),
])
def test_content_part_shapes_give_the_same_example(image_part, text_key, text_type, reply_type):
    example = row_to_examples(parts_row(image_part, text_key, text_type, reply_type))[0]
    assert list(example.messages) == WANT and example.images == ("a.png",)


def test_url_values_are_kept_for_the_image_reader():
    # file:// and data: URLs are opened by finetune.data.images; http(s) is refused there, with one line.
    for url in ("file:///data/a.png", "https://example.com/a.png", "data:image/png;base64,AAAA"):
        row = parts_row({"type": "image_url", "image_url": {"url": url}})
        assert row_to_examples(row)[0].images == (url,)


def test_llamafactory_v1_row_mentions_the_same_image_twice_in_order():
    row = {"messages": [
        {"role": "user", "content": [{"type": "image_url", "value": "1.jpg"}, {"type": "text", "value": "Who?"}]},
        {"role": "assistant", "content": [{"type": "text", "value": "Kane."}]},
        {"role": "user", "content": [{"type": "text", "value": "Doing?"}, {"type": "image_url", "value": "1.jpg"}]},
        {"role": "assistant", "content": [{"type": "text", "value": "Celebrating."}]}]}
    example = row_to_examples(row)[0]
    assert [m["content"] for m in example.messages] == ["<image>Who?", "Kane.", "Doing?<image>", "Celebrating."]
    assert example.images == ("1.jpg", "1.jpg")


def test_parts_from_arrow_carry_every_key_with_nones(tmp_path):
    """A parquet/Hub dataset unifies the part structs: a text part gets image_url=None and the reverse."""
    rows = [parts_row({"type": "image_url", "image_url": {"url": "a.png"}}),
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]}]}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    examples, report = load_examples(str(tmp_path / "d.parquet"), DataConfig(), "train")
    assert not report.problems
    assert list(examples[0].messages) == WANT and examples[0].images == ("a.png",)
    assert examples[1].images == () and examples[1].messages[0]["content"] == "Hi"


def test_part_images_and_an_images_column_placeholder_only_parts():
    row = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]},
                        {"role": "assistant", "content": "red"}], "images": ["a.png"]}
    example = row_to_examples(row)[0]
    assert list(example.messages) == WANT and example.images == ("a.png",)


@pytest.mark.parametrize("part, reason", [
    ({"type": "video_url", "value": "a.mp4"}, "unsupported content part type 'video_url'"),
    ({"text": "no type"}, "a content part must be a mapping with a `type`"),
    ("bare string", "a content part must be a mapping with a `type`"),
    ({"type": "text", "text": {"value": "x"}}, "the text of a 'text' part must be a string"),
])
def test_unknown_parts_are_named(part, reason):
    row = {"messages": [{"role": "user", "content": [part]}, {"role": "assistant", "content": "x"}]}
    with pytest.raises(DataError, match=reason):
        row_to_examples(row)


def test_turn_keys_are_accepted_in_either_format():
    """ShareGPT exports mix the two spellings: conversations of role/content, messages of from/value."""
    as_conversations = {"image": "a.png", "conversations": [{"role": "user", "content": "<image>What colour is it?"},
                                                            {"role": "assistant", "content": "red"}]}
    as_messages = {"images": ["a.png"], "messages": [{"from": "human", "value": "<image>What colour is it?"},
                                                     {"from": "gpt", "value": "red"}]}
    for row in (as_conversations, as_messages):
        example = row_to_examples(row)[0]
        assert list(example.messages) == WANT and example.images == ("a.png",)


def conversation(**columns):
    return {"image": "a.png", "conversations": [{"from": "human", "value": "<image>What colour is it?"},
                                                {"from": "gpt", "value": "red"}], **columns}


@pytest.mark.parametrize("row, recipe, system", [
    (conversation(system_prompt="Be brief."), None, "Be brief."),  # lmms-finetune
    (conversation(system="Be brief."), None, "Be brief."),  # LLaMA-Factory's sharegpt `system` column
    (conversation(system_prompt="Be brief."), "Recipe.", "Be brief."),  # the row's own beats the recipe's
    (conversation(), "Recipe.", "Recipe."),  # the recipe's is the fallback
    (conversation(system_prompt=""), "Recipe.", "Recipe."),
    (conversation(system_prompt=None), None, None),
    ({"messages": [{"role": "developer", "content": "In the row."}, *WANT], "images": ["a.png"],
      "system": "Column."}, "Recipe.", "In the row."),  # a system turn in the conversation wins
    ({"image": "a.png", "question": "Q?", "answer": "A", "system_prompt": "Be brief."}, None, "Be brief."),
])
def test_system_prompt_column_becomes_the_system_turn(row, recipe, system):
    messages = row_to_examples(row, system_prompt=recipe)[0].messages
    if system is None:
        assert all(m["role"] != "system" for m in messages)
    else:
        assert messages[0] == {"role": "system", "content": system}
        assert sum(m["role"] == "system" for m in messages) == 1


def test_a_system_column_that_is_not_text_is_named():
    with pytest.raises(DataError, match="`system_prompt` must be text"):
        row_to_examples(conversation(system_prompt=["a", "b"]))


def test_a_turn_needs_a_speaker_and_content():
    for turn in ({"from": "gpt"}, {"value": "x"}, {"role": None, "content": "x"}):
        with pytest.raises(DataError, match="each turn of `conversations` needs role/from and content/value"):
            row_to_examples({"conversations": [{"from": "human", "value": "Hi"}, turn]})


def test_an_image_list_written_as_json_text_in_a_csv_cell(tmp_path):
    datasets.Dataset.from_list([{"image": '["a.png", "b.png"]', "conversations": json.dumps(
        [{"from": "human", "value": "Same?"}, {"from": "gpt", "value": "No."}])}]).to_csv(str(tmp_path / "d.csv"))
    examples, report = load_examples(str(tmp_path / "d.csv"), DataConfig(), "train")
    assert not report.problems and examples[0].images == ("a.png", "b.png")
    assert examples[0].messages[0]["content"] == "<image>\n<image>\nSame?"
