"""Every supported source and format becomes the same canonical examples; bad rows are named."""

import json

import pytest
from PIL import Image

from finetune.config import DataConfig
from finetune.data.dataset import build_dataset, load_examples
from finetune.data.encode import ChatEncoder
from finetune.data.formats import detect_format, row_to_examples
from finetune.data.sources import read_rows
from finetune.errors import DataError

CANONICAL = [{"role": "user", "content": "<image>\nWhat colour is it?"}, {"role": "assistant", "content": "red"}]


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "img").mkdir()
    for name, colour in (("a.png", "red"), ("b.png", "blue")):
        Image.new("RGB", (64, 64), colour).save(tmp_path / "img" / name)
    return tmp_path


def vqa_rows():
    return [{"image": "img/a.png", "question": "What colour is it?", "answer": "red"},
            {"image": "img/b.png", "question": "What colour is it?", "answer": "blue"}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_json_csv_parquet_and_saved_dataset_read_the_same(folder):
    import datasets

    rows = vqa_rows()
    write_jsonl(folder / "d.jsonl", rows)
    (folder / "d.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).to_csv(str(folder / "d.csv"), index=False)
    datasets.Dataset.from_list(rows).to_parquet(str(folder / "d.parquet"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(folder / "saved"))
    cfg = DataConfig(image_root=str(folder))
    first_row = {"d.jsonl": 1, "d.json": 0, "d.csv": 2, "d.parquet": 0, "saved": 0}  # as each file numbers rows
    for spec, row in first_row.items():
        examples, report = load_examples(str(folder / spec), cfg, "train")
        assert not report.problems, spec
        assert list(examples[0].messages) == CANONICAL, spec
        assert examples[0].images == ("img/a.png",), spec
        assert examples[0].root == folder and examples[0].location == f"{folder / spec}:{row}", spec


def test_image_folder_with_metadata(folder):
    write_jsonl(folder / "img" / "metadata.jsonl",
                [{"file_name": "a.png", "question": "What colour is it?", "answer": "red"}])
    rows = read_rows(str(folder / "img"))
    assert rows.base_dir == folder / "img" and rows[0]["image"] == "a.png"


def test_llava_format_placeholder_anywhere_and_text_only_rows():
    late = {"image": "a.png", "conversations": [{"from": "human", "value": "What is this?\n<image>"},
                                                  {"from": "gpt", "value": "A cat."}]}
    assert detect_format(late) == "llava"
    assert row_to_examples(late)[0].messages[0]["content"] == "What is this?\n<image>"
    missing = {"image": "a.png", "conversations": [{"from": "human", "value": "What is this?"},
                                                     {"from": "gpt", "value": "A cat."}]}
    assert row_to_examples(missing)[0].messages[0]["content"] == "<image>\nWhat is this?"
    text_only = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    assert row_to_examples(text_only)[0].images == ()


def test_messages_format_string_and_parts():
    as_string = {"messages": [{"role": "user", "content": "<image>\nWhat colour is it?"},
                              {"role": "assistant", "content": "red"}], "images": ["a.png"]}
    as_parts = {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                                          {"type": "text", "text": "\nWhat colour is it?"}]},
                             {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]}
    for row in (as_string, as_parts):
        assert detect_format(row) == "messages"
        example = row_to_examples(row)[0]
        assert list(example.messages) == CANONICAL and example.images == ("a.png",)


def test_vqa_answers_list_trains_on_the_most_common_and_keeps_all():
    example = row_to_examples({"image": "a.png", "question": "Q?", "answers": ["2", "two", "2"]})[0]
    assert example.messages[1]["content"] == "2" and example.references == ("2", "two", "2")


def test_caption_rows_give_one_example_per_caption_and_column_map():
    examples = row_to_examples({"img": "a.png", "text": ["A cat.", "A pet."]}, columns={"image": "img",
                                                                                         "captions": "text"})
    assert [e.messages[1]["content"] for e in examples] == ["A cat.", "A pet."]
    assert all(e.images == ("a.png",) for e in examples)


@pytest.mark.parametrize("row, reason", [
    ({"image": "a.png", "conversations": [{"from": "human", "value": "<image> hi"}]}, "no assistant reply"),
    ({"image": "a.png", "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": " "}]},
     "empty"),
    ({"image": "a.png", "conversations": [{"from": "human", "value": "<image><image>"},
                                          {"from": "gpt", "value": "x"}]}, "2 <image> placeholder"),
    ({"foo": 1}, "cannot tell the row's format"),
    ({"conversations": [{"from": "robot", "value": "x"}]}, "unknown role .robot."),
])
def test_bad_rows_raise_clear_errors(row, reason):
    with pytest.raises(DataError, match=reason):
        row_to_examples(row)


def test_a_broken_dataset_is_reported_by_row_before_training(folder, processor):
    rows = vqa_rows() + [{"image": "img/missing.png", "question": "Q?", "answer": "x"},
                         {"image": "img/a.png", "question": "Q?"}]
    path = write_jsonl(folder / "d.jsonl", rows)
    with path.open("a") as handle:
        handle.write("{not json\n")
    encoder = ChatEncoder(processor, max_length=256)
    with pytest.raises(DataError) as err:
        build_dataset(str(path), DataConfig(), encoder, progress=False)
    message = str(err.value)
    assert f"{path}:3: image not found" in message
    assert f"{path}:4: " in message and f"{path}:5: malformed JSON" in message
    assert "3 unusable row(s) of 5" in message
    dataset, report = build_dataset(str(path), DataConfig(on_error="skip"), encoder, progress=False)
    assert len(dataset) == 2 and len(report.problems) == 3
    assert dataset.lengths == [len(dataset[i]["input_ids"]) for i in range(2)]


def test_rows_too_long_are_dropped_and_named(folder, processor, caplog):
    rows = vqa_rows() + [{"image": "img/a.png", "question": "word " * 400, "answer": "x"}]
    path = write_jsonl(folder / "d.jsonl", rows)
    encoder = ChatEncoder(processor, max_length=128)  # one image is 64 tokens; a short VQA row about 86
    longest = len(ChatEncoder(processor, max_length=10**6).encode(load_examples(str(path), DataConfig(), "train")[0][2])
                  ["input_ids"])
    with caplog.at_level("WARNING", logger="finetune"):
        dataset, report = build_dataset(str(path), DataConfig(max_length=128, on_too_long="drop"), encoder,
                                        progress=False)
    assert len(dataset) == 2 and report.too_long == [(f"{path}:3", longest)]
    assert (f"dropped 1 of 3 examples (33.3%) are longer than data.max_length=128 (the longest has {longest} "
            f"tokens): {path}:3 (data.max_length={longest} fits them all)") in caplog.text
    with pytest.raises(DataError, match=f"{path}:3: .*data.on_too_long=fail"):
        build_dataset(str(path), DataConfig(max_length=128, on_too_long="fail"), encoder, progress=False)


def test_a_max_length_that_would_empty_much_of_the_data_fails_by_default(folder, processor, caplog):
    """The default (auto) drops a stray long row, but refuses to drop more than 1% of the data silently."""
    long_row = {"image": "img/a.png", "question": "word " * 400, "answer": "x"}
    encoder = ChatEncoder(processor, max_length=128)
    many = write_jsonl(folder / "many.jsonl", vqa_rows() * 20 + [long_row])  # 1 of 41: 2.4%
    with pytest.raises(DataError, match=r"(?s)1 of 41 examples \(2.4%\) .*raise data.max_length .*data.on_too_long=drop"):
        build_dataset(str(many), DataConfig(max_length=128), encoder, progress=False)
    few = write_jsonl(folder / "few.jsonl", vqa_rows() * 60 + [long_row])  # 1 of 121: 0.8%
    with caplog.at_level("WARNING", logger="finetune"):
        dataset, report = build_dataset(str(few), DataConfig(max_length=128), encoder, progress=False)
    assert len(dataset) == 120 and [loc for loc, _ in report.too_long] == [f"{few}:121"]
    assert "dropped 1 of 121 examples" in caplog.text


def test_missing_file_and_unknown_hub_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="data file not found"):
        read_rows(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="cannot load dataset 'someone/not-a-dataset'"):
        read_rows("someone/not-a-dataset")


def test_template_and_processor_rejections_name_the_row(folder, random_tiny, tmp_path):
    """A template that raises (roles must alternate) is the row's problem, reported like a missing image."""
    import shutil

    from finetune.data.check import check_data

    strict = tmp_path / "strict"
    shutil.copytree(random_tiny, strict)
    template = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
                "<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}{% else %}"
                "{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>{% else %}{{ p['text'] }}{% endif %}"
                "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (strict / "chat_template.jinja").write_text(template)
    rows = vqa_rows() + [{"image": "img/a.png", "conversations": [
        {"from": "human", "value": "<image>\nHi"}, {"from": "human", "value": "Hello?"}, {"from": "gpt", "value": "x"}]}]
    path = write_jsonl(folder / "d.jsonl", rows)
    lines = []
    ok = check_data({"model": {"name": str(strict)}, "data": {"train": str(path), "image_root": str(folder)}},
                    write=lines.append)
    assert not ok
    assert f"{path}:3: the chat template rejected the row: Conversation roles must alternate user/assistant" in lines


def test_a_tokenizer_without_a_pad_token_pads_with_eos(random_tiny, tmp_path):
    import shutil

    from finetune.config import ModelConfig
    from finetune.models import load_processor

    no_pad = tmp_path / "no-pad"
    shutil.copytree(random_tiny, no_pad)
    config = json.loads((no_pad / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)
    (no_pad / "tokenizer_config.json").write_text(json.dumps(config))
    processor = load_processor(ModelConfig(name=str(no_pad)))
    assert processor.tokenizer.pad_token == processor.tokenizer.eos_token == "<|im_end|>"
