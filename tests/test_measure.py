"""The data check without pixels: header sizes, the processors' token formulas and the cache give exactly what a
full encode gives, for every family twin; broken images are still named; the cache is reused and invalidated."""

import importlib.util
import json
import threading
import time

import pytest
from families import FAMILIES, twin
from PIL import Image

from finetune.config import DataConfig, ModelConfig
from finetune.data import check_cache, measure
from finetune.data.dataset import build_dataset, check_examples, load_examples
from finetune.data.encode import ChatEncoder, make_encoder
from finetune.data.formats import row_to_examples
from finetune.data.images import image_size, open_image
from finetune.data.measure import OK, TOO_LONG, UNUSABLE, Measurer
from finetune.errors import DataError
from finetune.models import load_processor

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
ROTATED = 6  # EXIF orientation "rotate 90 CW": the picture is stored sideways


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """Images of several sizes and formats, one stored sideways with an EXIF rotation."""
    folder = tmp_path_factory.mktemp("pictures")
    for width, height in ((40, 30), (30, 40), (640, 480), (333, 500), (17, 301), (64, 48)):
        Image.new("RGB", (width, height), (200, 40, 40)).save(folder / f"{width}x{height}.jpg")
    exif = Image.Exif()
    exif[0x0112] = ROTATED
    Image.new("RGB", (64, 48), (10, 200, 40)).save(folder / "sideways.jpg", exif=exif.tobytes())
    Image.new("RGBA", (50, 20), (0, 0, 255, 128)).save(folder / "alpha.png")
    Image.new("RGB", (45, 70), (0, 90, 90)).save(folder / "photo.webp")
    Image.new("RGB", (30, 30), (0, 90, 90)).save(folder / "anim.gif")  # no header check for GIF: decoded in full
    return folder


def rows_for(family_has_template: bool, pictures) -> list[dict]:
    names = sorted(p.name for p in pictures.iterdir())
    rows = [{"image": name, "question": "What color is the cat?", "answer": "It is red."} for name in names]
    if family_has_template:
        rows += [{"image": name, "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."},
            {"from": "human", "value": "Where?"}, {"from": "gpt", "value": "On the sofa, next to a dog."}]}
            for name in names]
        rows += [{"images": [names[0], "sideways.jpg"], "conversations": [
                     {"from": "system", "value": "Answer briefly."},
                     {"from": "human", "value": "<image>\n<image>\nWhich one is green?"}, {"from": "gpt", "value": "The second."}]},
                 {"conversations": [{"from": "human", "value": "Is the sky blue?"}, {"from": "gpt", "value": "Yes."}]}]
    return rows


def examples_of(rows, root):
    return [e.placed(f"rows:{i}", root) for i, row in enumerate(rows) for e in row_to_examples(row)]


def gifs(examples) -> int:
    return sum("anim.gif" in e.images for e in examples)


def full_encode(encoder, example):
    """What training's encode says of an example, in the measure's terms."""
    from finetune.data.encode import TooLong

    try:
        return OK, len(encoder.encode(example)["input_ids"])
    except TooLong as err:
        return TOO_LONG, err.length
    except DataError:
        return UNUSABLE, 0


def assert_measures_equal_full_encodes(processor, examples, max_length=100_000, all_usable=True):
    encoder = make_encoder(processor, max_length)
    measurer = Measurer(encoder)
    measured = measurer.measure(examples)
    for example, (code, tokens, reason) in zip(examples, measured):
        assert (code, tokens) == full_encode(encoder, example), (example.images, reason)
        assert code == OK or not all_usable, (example.images, reason)
    return measurer


# --- token counts ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(FAMILIES))
def test_measured_lengths_equal_a_full_encode_for_every_family(name, tmp_path_factory, pictures):
    family = FAMILIES[name]
    folder = twin(name, tmp_path_factory)
    if family.needs_torchvision and not HAS_TORCHVISION:
        pytest.skip("Qwen2-VL / Qwen2.5-VL processors cannot be loaded without torchvision, which is not installed")
    processor = load_processor(ModelConfig(name=str(folder)))
    examples = examples_of(rows_for(family.chat_template is not None, pictures), pictures)
    measurer = assert_measures_equal_full_encodes(processor, examples)
    assert measurer.formula  # the family's formula held against its processor ...
    assert measurer.full_encodes == gifs(examples)  # ... and only GIF rows needed their pixels


def test_measured_lengths_equal_a_full_encode_for_the_embedded_model(processor, pictures):
    examples = examples_of(rows_for(True, pictures), pictures)
    measurer = assert_measures_equal_full_encodes(processor, examples)
    assert measurer.formula and measurer.full_encodes == gifs(examples)


def test_settings_the_formula_does_not_cover_fall_back_to_full_encodes(random_tiny, pictures):
    """Without the center crop LLaVA's tokens follow the resized image, which the formula does not know: the
    start-up probe sees the difference, and every image row is encoded in full, still exact."""
    processor = load_processor(ModelConfig(name=str(random_tiny), processor={"do_center_crop": False}))
    examples = examples_of(rows_for(True, pictures), pictures)
    # (Two images of different shapes in one row cannot be stacked any more: the processor rejects that row.)
    measurer = assert_measures_equal_full_encodes(processor, examples, all_usable=False)
    assert not measurer.formula
    assert measurer.full_encodes == sum(1 for e in examples if e.images)


def test_rows_over_max_length_are_cut_or_too_long_as_the_encoder_decides(processor, pictures):
    def row(first_question, second_question):
        return {"image": "64x48.jpg", "conversations": [
            {"from": "human", "value": "<image>\n" + first_question}, {"from": "gpt", "value": "Red."},
            {"from": "human", "value": second_question}, {"from": "gpt", "value": "Blue."}]}

    examples = examples_of([row("Q?", "Q?"), row("Q?", "word " * 80), row("word " * 80, "Q?")], pictures)
    encoder = ChatEncoder(processor, max_length=128)  # 64 image tokens: row 2's first reply fits, row 3's does not
    measured = Measurer(encoder).measure(examples)
    assert [code for code, _, _ in measured] == [OK, OK, TOO_LONG]
    assert measured[1][1] == 128 == len(encoder.encode(examples[1])["input_ids"])
    assert "do not fit in data.max_length=128" in measured[2][2]


# --- broken images ------------------------------------------------------------------------------------------
def test_the_header_check_catches_a_truncated_jpeg_and_an_unreadable_file(tmp_path, processor):
    Image.new("RGB", (640, 480), (30, 60, 90)).save(tmp_path / "whole.jpg")
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) - 200])  # the header is intact, the end is missing
    (tmp_path / "text.jpg").write_text("not a picture")
    assert image_size("whole.jpg", tmp_path) == (640, 480)
    assert image_size("cut.jpg", tmp_path) is None  # only a decode can tell
    with pytest.raises(DataError, match="unreadable image"):
        open_image("cut.jpg", tmp_path)
    with pytest.raises(DataError, match=f"unreadable image: {tmp_path / 'text.jpg'}"):
        image_size("text.jpg", tmp_path)
    rows = [{"image": name, "question": "Q?", "answer": "a"} for name in ("whole.jpg", "cut.jpg", "text.jpg", "gone.jpg")]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as err:
        build_dataset(str(path), DataConfig(cache=False), ChatEncoder(processor, 256), progress=False)
    message = str(err.value)
    assert f"{path}:2: unreadable image: {tmp_path / 'cut.jpg'} (image file is truncated" in message
    assert f"{path}:3: unreadable image: {tmp_path / 'text.jpg'}" in message
    assert f"{path}:4: image not found: {tmp_path / 'gone.jpg'}" in message
    assert "3 unusable row(s) of 4" in message


def test_exif_rotation_is_in_the_header_size(pictures):
    assert image_size("sideways.jpg", pictures) == open_image("sideways.jpg", pictures).size == (48, 64)
    assert image_size("alpha.png", pictures) == (50, 20) and image_size("photo.webp", pictures) == (45, 70)


# --- the cache ------------------------------------------------------------------------------------------------
@pytest.fixture
def counted(monkeypatch):
    """What the check did: `encoded` (full encodes, the start-up probe's included) and `measured` (examples)."""
    calls = {"encoded": [], "measured": []}
    encode, measure_ = ChatEncoder.encode, Measurer.measure

    def counting_encode(self, example, images=None):
        calls["encoded"].append(example.location)
        return encode(self, example, images)

    def counting_measure(self, examples):
        calls["measured"] += [e.location for e in examples]
        return measure_(self, examples)

    monkeypatch.setattr(ChatEncoder, "encode", counting_encode)
    monkeypatch.setattr(Measurer, "measure", counting_measure)
    return calls


@pytest.fixture
def data(tmp_path, pictures, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    for name in ("640x480.jpg", "sideways.jpg"):
        (tmp_path / name).write_bytes((pictures / name).read_bytes())
    rows = [{"image": "640x480.jpg", "question": "What is it?", "answer": "A cat."},
            {"image": "sideways.jpg", "conversations": [{"from": "human", "value": "<image>\nAnd this?"},
                                                         {"from": "gpt", "value": "A dog."}]},
            {"image": "gone.png", "question": "Q?", "answer": "x"},
            {"image": "640x480.jpg", "question": "word " * 300, "answer": "x"}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def check(path, processor, **settings):
    cfg = DataConfig(on_too_long="drop", **settings)
    return check_examples(str(path), cfg, ChatEncoder(processor, cfg.max_length), progress=False)


def test_a_second_check_reads_the_cache_and_encodes_nothing(data, processor, counted):
    kept, lengths, report = check(data, processor, max_length=256)
    assert counted["encoded"] and len(counted["measured"]) == 4
    assert report.problems == [(f"{data}:3", f"image not found: {data.parent / 'gone.png'}")]
    assert report.too_long == [(f"{data}:4", report.too_long[0][1])] and report.too_long[0][1] > 256
    assert len(list(check_cache.checks_dir().glob("*.npz"))) == 1
    counted["encoded"].clear(), counted["measured"].clear()
    again = check(data, processor, max_length=256)
    assert counted == {"encoded": [], "measured": []}
    assert again[1] == lengths and again[2].problems == report.problems and again[2].too_long == report.too_long
    assert [e.location for e in again[0]] == [e.location for e in kept]


@pytest.mark.parametrize("change", ["data file", "max_length", "processor", "cache off"])
def test_the_cache_is_not_used_when_what_it_measured_changed(change, data, processor, random_tiny, counted, tmp_path):
    check(data, processor, max_length=256)
    counted["measured"].clear()
    settings = {"max_length": 256}
    if change == "data file":
        data.write_text(data.read_text().replace("A cat.", "A cat on a sofa."))
    elif change == "max_length":
        settings["max_length"] = 300
    elif change == "processor":
        import shutil

        other = tmp_path / "other"
        shutil.copytree(random_tiny, other)
        template = (other / "chat_template.jinja").read_text()
        (other / "chat_template.jinja").write_text(template.replace("<|im_start|>", "<|im_start|> "))
        processor = load_processor(ModelConfig(name=str(other)))
    else:
        settings["cache"] = False
    kept, lengths, _ = check(data, processor, **settings)
    assert len(counted["measured"]) == 4  # every example measured again
    encoder = ChatEncoder(processor, settings["max_length"])
    assert lengths == [len(encoder.encode(e)["input_ids"]) for e in kept]


def test_an_example_whose_image_changed_is_measured_again_alone(data, processor, counted):
    check(data, processor, max_length=256)
    counted["measured"].clear()
    Image.new("RGB", (48, 64), (1, 2, 3)).save(data.parent / "640x480.jpg")  # replaced under the same name
    (data.parent / "gone.png").write_bytes((data.parent / "sideways.jpg").read_bytes())  # appeared
    kept, lengths, report = check(data, processor, max_length=256)
    assert sorted(counted["measured"]) == [f"{data}:1", f"{data}:3", f"{data}:4"]
    assert not report.problems and len(kept) == 3
    encoder = ChatEncoder(processor, 256)
    assert lengths == [len(encoder.encode(e)["input_ids"]) for e in kept]
    counted["measured"].clear()
    assert check(data, processor, max_length=256)[1] == lengths and not counted["measured"]


def test_lengths_for_group_by_length_are_the_encoded_lengths(data, processor):
    for _ in range(2):  # measured, then from the cache
        dataset, _ = build_dataset(str(data), DataConfig(max_length=256, on_error="skip", on_too_long="drop"),
                                   ChatEncoder(processor, 256), progress=False)
        assert dataset.lengths == [len(dataset[i]["input_ids"]) for i in range(len(dataset))]


def test_worker_processes_give_the_serial_results(tmp_path, pictures, processor, monkeypatch):
    monkeypatch.setattr("finetune.data.checking.CHUNK", 8)
    rows = rows_for(True, pictures) * 4
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"image_root": str(pictures), "cache": False, "max_length": 256, "on_too_long": "drop"}
    serial = check_examples(str(path), DataConfig(num_proc=1, **cfg), ChatEncoder(processor, 256), progress=False)
    forked = check_examples(str(path), DataConfig(num_proc=2, **cfg), ChatEncoder(processor, 256), progress=False)
    assert serial[1] == forked[1] and serial[2].problems == forked[2].problems
    assert len(serial[0]) == len(load_examples(str(path), DataConfig(**cfg), "train")[0])


def test_a_waiting_rank_reads_local_rank_0s_results(tmp_path, monkeypatch):
    """Rank 1 measures nothing: it waits while rank 0 holds the lock, then reads rank 0's file."""
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path))
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    examples = row_to_examples({"question": "Q?", "answer": "a"}) * 3
    rank0 = check_cache.CheckCache("k")
    rank0.path.parent.mkdir(parents=True)
    rank0.lock.acquire()
    results = [(OK, 7, None), (UNUSABLE, 0, "why"), (OK, 9, None)]

    def finish():
        time.sleep(0.5)
        rank0._save(results, check_cache.image_signatures(examples))
        rank0.lock.release()

    threading.Thread(target=finish).start()
    got = check_cache.CheckCache("k").measured(examples, lambda indices: pytest.fail("rank 1 measured"))
    assert got == results


# --- reading big JSON files -------------------------------------------------------------------------------------
def test_json_lists_are_read_in_chunks_exactly_as_json_loads_reads_them(tmp_path, monkeypatch):
    from finetune.data.sources import read_rows

    monkeypatch.setattr("finetune.data.sources.CHUNK", 7)  # every value crosses chunk ends
    rows = [{"id": 12345678, "text": "caf\u00e9 \u2028 \U0001f600", "n": [1.5, -2e-3, None, True]}, 3, {"a": "b"}]
    path = tmp_path / "d.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows, indent=1, ensure_ascii=False).encode())
    read = read_rows(str(path))
    assert next(iter(read)) == rows[0] and read[2] == rows[2] and read[1].reason == "a row must be a JSON object"
    for broken in ('[{"a": 1},\n{"b": ]', '[{"a": 1}\n{"b": 2}]', '[{"a": 1},\n\n{"b": 2}] x'):
        path.write_text(broken)
        try:
            json.loads(broken)
        except json.JSONDecodeError as err:
            expected = f"{path}:{err.lineno}: malformed JSON ({err.msg})"
        with pytest.raises(DataError) as got:
            read_rows(str(path))
        assert str(got.value) == expected


def test_measure_module_lists_only_processors_it_checks():
    assert set(measure.EXPANSIONS) >= {FAMILIES[n].processor_class for n in FAMILIES}
