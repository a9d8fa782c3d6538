"""`finetune data show`: what it prints is what training encodes (token and image-token counts, supervised spans),
on the embedded tiny model and on family twins; markers off a terminal, colour on one; bad rows as file:row."""

import importlib.util
import io
import json
import re

import pytest
from families import FAMILIES, twin
from PIL import Image
from transformers import AutoConfig, AutoProcessor

from finetune.cli import main
from finetune.config import DataConfig
from finetune.data.dataset import load_examples
from finetune.data.encode import IGNORE, ChatEncoder
from finetune.data.show import GREEN, RESET, show_data

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
PINNED = {"row", "text", "supervised", "tokens", "image_tokens"}
ROWS = [
    {"image": "a.png", "question": "What color is the cat?", "answer": "A red cat."},
    {"image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is on the table?"},
        {"from": "gpt", "value": "There is a cup of coffee and a book."},
        {"from": "human", "value": "Is it sunny?"},
        {"from": "gpt", "value": "Yes."},
    ]},
]
REPLIES = [["A red cat."], ["There is a cup of coffee and a book.", "Yes."]]


def write_data(folder, rows=ROWS, size=(64, 48)):
    Image.new("RGB", size, (200, 40, 40)).save(folder / "a.png")
    path = folder / "train.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def run_cli(capsys, *argv):
    code = 0
    try:
        code = main(["data", "show", "demo/vqa", *argv])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def expected(model_folder, data_path):
    """What training encodes for each row, computed here with the encoder and the model config's image token id."""
    processor = AutoProcessor.from_pretrained(model_folder)
    image_id = AutoConfig.from_pretrained(model_folder).image_token_id
    examples, _ = load_examples(str(data_path), DataConfig(), "train")
    encoder = ChatEncoder(processor, max_length=2048)
    return processor, image_id, [encoder.encode(example) for example in examples]


def repeat(token):
    return lambda match: token * int(match.group(1))


def check_json(out, model_folder, data_path):
    processor, image_id, features = expected(model_folder, data_path)
    tokenizer = processor.tokenizer
    shown = [json.loads(line) for line in out.splitlines()]
    assert len(shown) == len(ROWS)
    for index, (row, feats, replies) in enumerate(zip(shown, features, REPLIES)):
        assert set(row) == PINNED
        assert row["row"] == f"{data_path}:{index + 1}"
        ids = feats["input_ids"]
        assert row["tokens"] == len(ids)
        assert row["image_tokens"] == ids.count(image_id) > 0
        # Image runs are compressed: the token once, then ×count, never the token twice in a row.
        image_text = tokenizer.convert_ids_to_tokens(image_id)
        assert f"{image_text}×" in row["text"] and image_text * 2 not in row["text"]
        assert sum(int(n) for n in re.findall(re.escape(image_text) + r"×(\d+)", row["text"])) == row["image_tokens"]
        # Each reply lies inside one supervised span, and each span is text the model reads.
        for reply in replies:
            assert any(reply in span for span in row["supervised"]), (reply, row["supervised"])
        for span in row["supervised"]:
            assert span in row["text"]
        # The spans are exactly the labelled tokens (compared without whitespace: a span decoded alone can
        # lose the leading space a SentencePiece token carries in context).
        labelled = [t for t, label in zip(ids, feats["labels"]) if label != IGNORE]
        direct = tokenizer.decode(labelled, skip_special_tokens=False)
        assert re.sub(r"\s", "", "".join(row["supervised"])) == re.sub(r"\s", "", direct)
        # The text is the whole input decoded with special tokens kept, image runs written out again.
        expanded = re.sub(re.escape(image_text) + r"×(\d+)", repeat(image_text), row["text"])
        assert expanded == tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def test_json_on_the_embedded_tiny_model(random_tiny, tmp_path, capsys):
    data = write_data(tmp_path)
    code, out, err = run_cli(capsys, f"model.name={random_tiny}", f"data.train={data}", "--json")
    assert code == 0, err
    check_json(out, random_tiny, data)


FAMILY_NAMES = ["llava-1.5", "llava-next-mistral", "smolvlm", "gemma3", "qwen2.5-vl"]


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_json_on_family_twins(name, tmp_path, tmp_path_factory, capsys):
    family = FAMILIES[name]
    if family.needs_torchvision and not HAS_TORCHVISION:
        pytest.skip("transformers 5 builds this family's processor only with torchvision")
    folder = twin(name, tmp_path_factory)
    data = write_data(tmp_path, size=family.image_size)
    code, out, err = run_cli(capsys, f"model.name={folder}", f"data.train={data}", "--json")
    assert code == 0, err
    check_json(out, folder, data)


def test_markers_when_not_a_terminal(random_tiny, tmp_path, capsys):
    data = write_data(tmp_path)
    code, out, err = run_cli(capsys, f"model.name={random_tiny}", f"data.train={data}")
    assert code == 0, err
    assert "\033[" not in out
    spans = re.findall(r"\[\[(.*?)\]\]", out, flags=re.DOTALL)
    for reply in [r for replies in REPLIES for r in replies]:
        assert any(reply in span for span in spans), (reply, spans)
    assert "What color is the cat?" not in "".join(spans)  # the question is not supervised
    assert re.search(r"\n--- .*train\.jsonl:2: \d+ tokens, \d+ image tokens\n", out)


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_colour_on_a_terminal(random_tiny, tmp_path, monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    data = write_data(tmp_path)
    out, err = Terminal(), io.StringIO()
    assert show_data("demo/vqa", [f"model.name={random_tiny}", f"data.train={data}"], rows=1, out=out, err=err)
    text = out.getvalue()
    assert "[[" not in text
    assert re.search(re.escape(GREEN) + r"[^\033]*A red cat\.[^\033]*" + re.escape(RESET), text)
    monkeypatch.setenv("NO_COLOR", "1")
    out = Terminal()
    show_data("demo/vqa", [f"model.name={random_tiny}", f"data.train={data}"], rows=1, out=out, err=err)
    assert "\033[" not in out.getvalue() and "[[" in out.getvalue()


def test_bad_rows_are_named_not_tracebacks(random_tiny, tmp_path, capsys):
    rows = [ROWS[0], {"image": "missing.png", "question": "What is it?", "answer": "No."}, "{not json",
            {"image": "a.png", "question": "What is it?"}, ROWS[0]]
    data = write_data(tmp_path, rows)
    code, out, err = run_cli(capsys, f"model.name={random_tiny}", f"data.train={data}", "--json", "--rows", "5")
    assert code == 1
    assert "Traceback" not in err
    problems = err.strip().splitlines()
    assert [line.split(": ")[0] for line in problems] == [f"{data}:2", f"{data}:3", f"{data}:4"]
    assert "image not found" in problems[0] and "malformed JSON" in problems[1]
    assert [json.loads(line)["row"] for line in out.splitlines()] == [f"{data}:1", f"{data}:5"]


def test_rows_limit_eval_fallback_and_max_length(random_tiny, tmp_path, capsys):
    data = write_data(tmp_path, [ROWS[0]] * 5)
    code, out, _ = run_cli(capsys, f"model.name={random_tiny}", f"data.train={data}", "--json", "--rows", "2")
    assert code == 0 and len(out.splitlines()) == 2
    # No data.train: data.eval is shown.
    code, out, _ = run_cli(capsys, f"model.name={random_tiny}", "data.train=null", f"data.eval={data}", "--json")
    assert code == 0 and [json.loads(line)["row"] for line in out.splitlines()] == [f"{data}:{i}" for i in (1, 2, 3)]
    # A row that cannot fit data.max_length without cutting image tokens is reported, as training drops it.
    code, out, err = run_cli(capsys, f"model.name={random_tiny}", f"data.train={data}", "data.max_length=16",
                             "--rows", "1")
    assert code == 1 and f"{data}:1: " in err and "data.max_length=16" in err
