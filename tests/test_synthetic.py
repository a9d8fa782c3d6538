"""The synthetic shapes data: deterministic, held-out eval split, every attribute named, safe caching."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from finetune.demo import synthetic
from finetune.demo.synthetic import (
    COUNT_WORDS,
    KINDS,
    SPLITS,
    make_scenes,
    parse_spec,
    render,
    synthetic_path,
    write_dataset,
)


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """A temporary FINETUNE_CACHE shared by this session's synthetic/tiny tests (restored afterwards)."""
    path = tmp_path_factory.getbasetemp() / "finetune-cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FINETUNE_CACHE", str(path))
        yield path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_bytes(tmp_path, kind):
    first = write_dataset(kind, "train", tmp_path / "a", n=6, seed=3)
    second = write_dataset(kind, "train", tmp_path / "b", n=6, seed=3)
    assert first.read_bytes() == second.read_bytes()
    for row in read_jsonl(first):
        assert (first.parent / row["image"]).read_bytes() == (second.parent / row["image"]).read_bytes()
    other = write_dataset(kind, "train", tmp_path / "c", n=6, seed=4)
    assert other.read_bytes() != first.read_bytes()


def test_eval_images_are_held_out(tmp_path):
    train = write_dataset("caption", "train", tmp_path, n=100)
    held_out = write_dataset("caption", "eval", tmp_path, n=50)
    train_bytes = {(tmp_path / row["image"]).read_bytes() for row in read_jsonl(train)}
    eval_bytes = {(tmp_path / row["image"]).read_bytes() for row in read_jsonl(held_out)}
    assert not train_bytes & eval_bytes


def test_images_are_small_rgb_pngs_next_to_the_jsonl(tmp_path):
    path = write_dataset("caption", "eval", tmp_path / "out", n=4)
    assert path.parent == tmp_path / "out"
    for row in read_jsonl(path):
        assert not Path(row["image"]).is_absolute() and row["image"].startswith("images/")
        with Image.open(path.parent / row["image"]) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "RGB", (64, 64))


def test_captions_name_every_attribute():
    for scene in make_scenes(300, seed=0):
        words = scene.caption().split()
        assert words[0] == COUNT_WORDS[scene.count]
        assert scene.color in words and scene.position in words
        assert (scene.shape if scene.count == 1 else scene.shape + "s") in words


def test_vqa_rows_cover_each_attribute_with_normalised_answers(tmp_path):
    path = write_dataset("vqa", "train", tmp_path, n=20, seed=5)
    rows = read_jsonl(path)
    assert len(rows) == 4 * 20
    assert len({row["id"] for row in rows}) == len(rows)
    scenes = make_scenes(20, seed=5)
    for i, scene in enumerate(scenes):
        by_type = {row["question_type"]: row for row in rows[4 * i : 4 * i + 4]}
        assert set(by_type) == {"color", "shape", "count", "position"}
        assert {row["image"] for row in by_type.values()} == {f"images/train-{i:05d}.png"}
        assert by_type["color"]["answer"] == scene.color
        assert by_type["shape"]["answer"] == scene.shape
        assert by_type["count"]["answer"] == str(scene.count)  # digits, as VQA normalisation writes them
        assert by_type["position"]["answer"] == scene.position
        for row in by_type.values():
            assert row["answer"] == row["answer"].lower().strip()
            assert row["answer"] in scene.caption() or row["question_type"] == "count"


def test_dialogues_are_llava_instruct_conversations(tmp_path):
    path = write_dataset("dialogue", "eval", tmp_path, n=30)
    scenes = make_scenes(30, seed=synthetic.SPLIT_SEEDS["eval"])
    turn_counts = set()
    for row, scene in zip(read_jsonl(path), scenes):
        turns = row["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        turn_counts.add(len(turns) // 2)
        assert turns[0]["value"].startswith("<image>\n")
        assert sum(t["value"].count("<image>") for t in turns) == 1
        assert scene.caption() in turns[1]["value"]
    assert turn_counts == {2, 3}


def test_every_scene_is_unambiguous():
    """Shapes never overlap, and each sits clearly nearer its own edge than any other."""
    for scene in make_scenes(500, seed=9):
        assert len(scene.corners) == scene.count
        for x, y in scene.corners:
            cx, cy = x + scene.size / 2, y + scene.size / 2
            distances = {"left": cx, "right": 64 - cx, "top": cy, "bottom": 64 - cy}
            nearest = min(distances, key=distances.get)
            assert nearest == scene.position
            assert all(d >= distances[nearest] + 6 for edge, d in distances.items() if edge != nearest)
        for i, (x1, y1) in enumerate(scene.corners):
            for x2, y2 in scene.corners[i + 1 :]:
                assert abs(x1 - x2) >= scene.size + 2 or abs(y1 - y2) >= scene.size + 2


def test_render_draws_the_colour():
    scene = make_scenes(1, seed=0)[0]
    colours = {colour for _, colour in render(scene).getcolors(64 * 64)}
    assert synthetic.COLORS[scene.color] in colours and synthetic.BACKGROUND in colours


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("synthetic:vqa/train", ("vqa", "train", synthetic.DEFAULT_SIZES["train"])),
        ("synthetic:caption/eval", ("caption", "eval", synthetic.DEFAULT_SIZES["eval"])),
        ("synthetic:dialogue/train?n=64", ("dialogue", "train", 64)),
    ],
)
def test_spec_parsing(spec, expected):
    assert parse_spec(spec) == expected


@pytest.mark.parametrize(
    "spec",
    ["synthetic:vqa", "synthetic:vqa/test", "synthetic:coco/train", "synthetic:vqa/train?n=0",
     "synthetic:vqa/train?n=00", "synthetic:vqa/train?n=x", "synthetic:vqa/train?size=3", "vqa/train", "synthetic:"],
)  # fmt: skip
def test_bad_specs_name_the_valid_choices(spec):
    with pytest.raises(ValueError) as err:
        synthetic_path(spec)
    message = str(err.value)
    assert "\n" not in message
    assert all(name in message for name in (*KINDS, *SPLITS))


def test_write_dataset_rejects_unknown_kind_or_split(tmp_path):
    with pytest.raises(ValueError, match="vqa"):
        write_dataset("coco", "train", tmp_path, n=1)
    with pytest.raises(ValueError, match="eval"):
        write_dataset("vqa", "test", tmp_path, n=1)


def test_synthetic_path_generates_once_into_the_cache(cache):
    path = synthetic_path("synthetic:vqa/eval?n=5")
    assert path.is_relative_to(cache) and path.name == "vqa_eval.jsonl"
    assert len(read_jsonl(path)) == 20
    stamp = path.stat().st_mtime_ns
    assert synthetic_path("synthetic:vqa/eval?n=5") == path
    assert path.stat().st_mtime_ns == stamp
    assert not [p for p in path.parent.parent.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_concurrent_processes_share_one_generation(cache):
    """Two torchrun-like ranks asking at once both get the complete file."""
    code = "from finetune.demo.synthetic import synthetic_path; print(synthetic_path('synthetic:caption/train?n=40'))"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [proc.communicate(timeout=120)[0].strip() for proc in procs]
    assert all(proc.returncode == 0 for proc in procs)
    assert outputs[0] == outputs[1]
    rows = read_jsonl(Path(outputs[0]))
    assert len(rows) == 40 and all((Path(outputs[0]).parent / row["image"]).is_file() for row in rows)
