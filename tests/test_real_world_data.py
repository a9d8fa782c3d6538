"""Small generated fixtures that reproduce the quirks of third-party datasets (LLaMA-Factory, lmms-finetune,
Qwen-VL, allennlp's NLVR2): lying file extensions, RGBA and 16-bit images, JSON Lines named .json, BOMs,
trailing empty lines, multi-image rows with `<image>` at the end, system prompt columns."""

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from finetune.config import DataConfig
from finetune.data.dataset import build_dataset, load_examples
from finetune.data.encode import ChatEncoder
from finetune.data.formats import IMAGE
from finetune.data.images import open_image
from finetune.data.sources import BadRow, read_rows
from finetune.errors import DataError

ROW = {"image": "a.png", "question": "What colour is it?", "answer": "red"}


def save(image, path, fmt):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt)
    return path


# --- files ----------------------------------------------------------------------------------------------------
def test_jsonl_ending_with_empty_lines_has_no_extra_rows(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROW) + "\n" + json.dumps(ROW) + "\n\n")  # LLaMA-Factory's v1 demo ends so
    rows = read_rows(str(path))
    assert len(rows) == 2 and not any(isinstance(r, BadRow) for r in rows)


def test_an_empty_line_inside_jsonl_is_still_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROW) + "\n\n" + json.dumps(ROW) + "\n")
    rows = read_rows(str(path))
    assert isinstance(rows[1], BadRow) and rows.location(1) == f"{path}:2"


def test_a_byte_order_mark_is_not_a_malformed_row(tmp_path):
    for name, text in (("d.jsonl", json.dumps(ROW) + "\n"), ("d.json", json.dumps([ROW]))):
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.encode())
        assert read_rows(str(tmp_path / name))[0] == ROW, name


def test_json_lines_named_json_and_a_list_named_jsonl(tmp_path):
    (tmp_path / "lines.json").write_text(json.dumps(ROW) + "\n" + json.dumps(ROW) + "\n")  # NLVR2's tiny-dev.json
    (tmp_path / "list.jsonl").write_text(json.dumps([ROW, ROW], indent=2))
    lines, listed = read_rows(str(tmp_path / "lines.json")), read_rows(str(tmp_path / "list.jsonl"))
    assert list(lines) == list(listed) == [ROW, ROW]
    assert lines.location(0) == f"{tmp_path / 'lines.json'}:1" and listed.location(0) == f"{tmp_path / 'list.jsonl'}:0"


def test_malformed_json_and_wrong_encoding_are_one_line_errors(tmp_path):
    (tmp_path / "bad.json").write_text('[{"a": 1},\n{"b": ]')
    with pytest.raises(DataError, match=r"bad.json:2: malformed JSON"):
        read_rows(str(tmp_path / "bad.json"))
    (tmp_path / "latin.jsonl").write_bytes(json.dumps({"question": "café"}, ensure_ascii=False).encode("latin-1"))
    with pytest.raises(DataError, match="latin.jsonl: not UTF-8 text"):
        read_rows(str(tmp_path / "latin.jsonl"))


# --- images ---------------------------------------------------------------------------------------------------
def test_extensions_that_lie_are_read_by_content(tmp_path):
    """lmms-finetune: soccer1.jpg is a PNG, soccer2.jpg a WebP; allennlp's NLVR2 .png files are JPEGs."""
    picture = Image.new("RGB", (40, 30), (200, 10, 10))
    for name, fmt in (("png.jpg", "PNG"), ("webp.jpg", "WEBP"), ("jpeg.png", "JPEG")):
        image = open_image(str(save(picture, tmp_path / name, fmt)), tmp_path)
        assert image.mode == "RGB" and image.size == (40, 30), name
        assert abs(int(image.getpixel((20, 15))[0]) - 200) < 8, name


def test_transparent_png_is_put_on_white():
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    image.putpixel((0, 0), (255, 0, 0, 255))
    rgb = open_image(image, None)
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (255, 0, 0) and rgb.getpixel((3, 3)) == (255, 255, 255)


def test_sixteen_bit_greyscale_is_scaled_not_clipped_to_white(tmp_path):
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    path = save(Image.fromarray(ramp), tmp_path / "scan.png", "PNG")
    assert Image.open(path).mode.startswith("I")
    pixels = np.asarray(open_image(str(path), tmp_path))[..., 0]
    assert pixels[0, 0] == 0 and pixels[-1, -1] == 255 and 120 < pixels.mean() < 135  # white would be 255


def test_file_and_data_urls_are_images_http_is_refused(tmp_path):
    path = save(Image.new("RGB", (8, 8), "blue"), tmp_path / "my pics" / "a.png", "PNG")
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "blue").save(buffer, format="PNG")
    values = [path.as_uri(), "file://localhost" + path.as_uri()[len("file://"):], "file://my%20pics/a.png",
              "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()]
    for value in values:
        assert open_image(value, tmp_path).getpixel((0, 0)) == (0, 0, 255), value
    with pytest.raises(DataError, match=r"^image URLs are not fetched \(https://x.org/a.png\)"):
        open_image("https://x.org/a.png", tmp_path)
    with pytest.raises(DataError, match="image not found"):
        open_image("file:///nowhere/a.png", tmp_path)
    with pytest.raises(DataError, match="unreadable image: data: URL image"):
        open_image("data:image/png;base64,bm90IGFuIGltYWdl", tmp_path)


def test_an_image_over_pillows_safety_limit_is_a_row_problem(tmp_path, monkeypatch):
    path = save(Image.new("RGB", (100, 100)), tmp_path / "huge.jpg", "JPEG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10,000 pixels is over twice the limit: refused
    with pytest.raises(DataError, match=r"^unreadable image: .*huge.jpg \(Image size"):
        open_image(str(path), tmp_path)


# --- whole rows through the chat encoder ----------------------------------------------------------------------
def tokens_per_image(encoder):
    ids = encoder.processor(text=[IMAGE], images=[Image.new("RGB", (32, 32))])["input_ids"][0]
    return sum(int(t) == encoder.image_token_id for t in ids)


@pytest.fixture
def lmms_folder(tmp_path):
    """lmms-finetune's layout: the json in one folder, images under another (data.image_root)."""
    images = tmp_path / "images"
    save(Image.new("RGB", (96, 64), "red"), images / "soccer1.jpg", "PNG")
    save(Image.new("RGB", (64, 96), "green"), images / "soccer2.jpg", "WEBP")
    save(Image.new("RGBA", (50, 70), (0, 0, 255, 128)), images / "post1.png", "PNG")
    rows = [
        {"system_prompt": "Answer by considering all images.", "image": ["soccer1.jpg", "soccer2.jpg", "post1.png"],
         "conversations": [{"from": "human", "value": "Which image has more people?<image><image><image>"},
                           {"from": "gpt", "value": "The second."}]},
        {"conversations": [{"from": "human", "value": "What is the capital of France?"},
                           {"from": "gpt", "value": "Paris."}]},
    ]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "multi.json").write_text(json.dumps(rows, indent=4))
    return tmp_path


def test_multi_image_row_with_images_at_the_end_and_a_system_prompt_trains(lmms_folder, processor):
    encoder = ChatEncoder(processor, max_length=1024)
    cfg = DataConfig(image_root=str(lmms_folder / "images"), max_length=1024)
    dataset, report = build_dataset(str(lmms_folder / "data" / "multi.json"), cfg, encoder, progress=False)
    assert not report.problems and not report.too_long and len(dataset) == 2
    first = dataset.examples[0]
    assert first.messages[0] == {"role": "system", "content": "Answer by considering all images."}
    text = encoder.render(list(first.messages))
    assert text.index("Answer by considering all images.") < text.index("Which image has more people?")
    features = dataset[0]
    image_tokens = sum(t == encoder.image_token_id for t in features["input_ids"])
    assert features["pixel_values"].shape[0] == 3 and image_tokens == 3 * tokens_per_image(encoder)
    assert "pixel_values" not in dataset[1]  # the text-only row


def test_an_image_mentioned_twice_and_placeholders_without_newlines_render_each_image(tmp_path, processor):
    """LLaMA-Factory's mllm_demo: `<image>Who are they?` and `What are they doing?<image>`, one file twice."""
    save(Image.new("RGB", (64, 64), "red"), tmp_path / "demo" / "1.jpg", "JPEG")
    row = {"messages": [{"content": "<image>Who are they?", "role": "user"},
                        {"content": "Kane and Gretzka.", "role": "assistant"},
                        {"content": "What are they doing?<image>", "role": "user"},
                        {"content": "Celebrating.", "role": "assistant"}],
           "images": ["demo/1.jpg", "demo/1.jpg"]}
    (tmp_path / "mllm.json").write_text(json.dumps([row], ensure_ascii=False))
    examples, report = load_examples(str(tmp_path / "mllm.json"), DataConfig(), "train")
    assert not report.problems and examples[0].images == ("demo/1.jpg", "demo/1.jpg")
    encoder = ChatEncoder(processor, max_length=1024)
    text = encoder.render(list(examples[0].messages))
    assert text.count(IMAGE) == 2
    # Each placeholder stays beside its own text (whatever whitespace the template puts around an image).
    assert text.index(IMAGE) < text.index("Who are they?") < text.index("What are they doing?") \
        < text.rindex(IMAGE) < text.index("Celebrating.")
    features = encoder.encode(examples[0])
    assert features["pixel_values"].shape[0] == 2
    assert sum(t == encoder.image_token_id for t in features["input_ids"]) == 2 * tokens_per_image(encoder)
