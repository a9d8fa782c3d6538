"""Deterministic synthetic image data: 1-3 identical coloured shapes in one region.

Every scene has four attributes (count, colour, shape, position) and yields a
caption that names all of them, one VQA question per attribute and a short
multi-turn dialogue. Everything is generated locally from a seed, so demos and
tests never need the network, and the same seed always gives the same bytes.

Specs such as ``"synthetic:vqa/train"`` or ``"synthetic:caption/eval?n=64"``
resolve (via :func:`synthetic_path`) to a JSONL file cached under
``$FINETUNE_CACHE`` (default ``~/.cache/finetune``).
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from PIL import Image, ImageDraw

from finetune.demo.cache import cache_dir, cached_build

IMAGE_SIZE = 64
BACKGROUND = (245, 245, 245)
# Far apart in RGB so that colour is never ambiguous, even after resizing.
COLORS = {
    "red": (215, 35, 35),
    "green": (30, 155, 50),
    "blue": (35, 70, 215),
    "yellow": (235, 205, 25),
    "purple": (140, 45, 175),
    "orange": (250, 135, 15),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
SIZE_RANGE = (12, 13)  # narrow, so that the coloured area never mimics another count

KINDS = ("vqa", "caption", "dialogue", "classification")  # classification: the shapes' colour as the label
SPLITS = ("train", "eval")
# 500 training scenes (2000 VQA rows): with 200, a 3-epoch LoRA gets colour,
# shape and position right but generalises poorly on counts (~0.88 overall).
DEFAULT_SIZES = {"train": 500, "eval": 50}
# Different seeds per split, so eval images are never seen in training.
SPLIT_SEEDS = {"train": 1, "eval": 2}
DATA_VERSION = "v2"  # bump whenever the generator changes, so stale caches are not reused

QUESTIONS = {
    "color": "What color are the shapes?",
    "shape": "What shape is shown?",
    "count": "How many shapes are there?",
    "position": "Where are the shapes?",
}
DESCRIBE_PROMPT = "Describe the image."

# A shape belongs to a position when its centre is nearest that image edge by
# at least this many pixels, so no scene is ambiguous (e.g. top-left corner).
_MARGIN = 6
_HALF = IMAGE_SIZE // 2
_HALVES = {  # (x0, y0, x1, y1): where to look for room, a 1-pixel border left free
    "left": (1, 1, _HALF, IMAGE_SIZE - 1),
    "right": (_HALF, 1, IMAGE_SIZE - 1, IMAGE_SIZE - 1),
    "top": (1, 1, IMAGE_SIZE - 1, _HALF),
    "bottom": (1, _HALF, IMAGE_SIZE - 1, IMAGE_SIZE - 1),
}
_GAP = 2  # minimum empty pixels between two shapes, so they stay countable


@dataclass(frozen=True)
class Scene:
    """One synthetic image: ``count`` identical shapes placed in one region."""

    shape: str
    color: str
    count: int
    position: str
    size: int
    corners: tuple[tuple[int, int], ...]  # top-left corner of each shape

    def place(self) -> str:
        """``"on the left"``, ``"at the top"``, ..."""
        return f"{'on' if self.position in ('left', 'right') else 'at'} the {self.position}"

    def caption(self) -> str:
        noun = self.shape if self.count == 1 else self.shape + "s"
        return f"{COUNT_WORDS[self.count]} {self.color} {noun} {self.place()}"

    def answers(self) -> dict[str, str]:
        # Already in VQA-normalised form: lower case, digits for numbers.
        return {"color": self.color, "shape": self.shape, "count": str(self.count), "position": self.position}

    def qa_pairs(self) -> list[tuple[str, str, str]]:
        """``(question_type, question, answer)`` for every attribute."""
        answers = self.answers()
        return [(qtype, question, answers[qtype]) for qtype, question in QUESTIONS.items()]

    def dialogue(self, rng: random.Random) -> list[tuple[str, str]]:
        """2-3 ``(user, assistant)`` turns: a description, then follow-up questions."""
        plural = self.count > 1
        replies = {
            "color": f"{'They are' if plural else 'It is'} {self.color}.",
            "shape": f"{'They are' if plural else 'It is a'} {self.shape}{'s' if plural else ''}.",
            "count": f"There {'are' if plural else 'is'} {self.count}.",
            "position": f"{'They are' if plural else 'It is'} {self.place()}.",
        }
        turns = [("What do you see in this image?", f"I see {self.caption()}.")]
        for qtype in rng.sample(list(QUESTIONS), rng.randint(1, 2)):
            turns.append((QUESTIONS[qtype], replies[qtype]))
        return turns


def sample_scene(rng: random.Random) -> Scene:
    """Draws the attributes uniformly, then places the shapes without overlap."""
    shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
    count, position = rng.randint(1, 3), rng.choice(POSITIONS)
    size = rng.randint(*SIZE_RANGE)
    corners: list[tuple[int, int]] = []
    tries = 0
    while len(corners) < count:  # rejection sampling
        tries += 1
        if tries % 500 == 0:  # the first shapes leave no room for the rest: start over
            corners = []
        x0, y0, x1, y1 = _HALVES[position]
        x, y = rng.randint(x0, x1 - size), rng.randint(y0, y1 - size)
        if _nearest_edge(x + size / 2, y + size / 2) == position and all(
            abs(x - cx) >= size + _GAP or abs(y - cy) >= size + _GAP for cx, cy in corners
        ):
            corners.append((x, y))
    return Scene(shape, color, count, position, size, tuple(sorted(corners)))


def _nearest_edge(cx: float, cy: float) -> str | None:
    distances = sorted((d, edge) for edge, d in zip(POSITIONS, (cx, IMAGE_SIZE - cx, cy, IMAGE_SIZE - cy)))
    return distances[0][1] if distances[0][0] + _MARGIN <= distances[1][0] else None


_SUPERSAMPLE = 4  # draw large, then downscale: anti-aliased edges keep circles round


def render(scene: Scene) -> Image.Image:
    k = _SUPERSAMPLE
    image = Image.new("RGB", (IMAGE_SIZE * k, IMAGE_SIZE * k), BACKGROUND)
    draw = ImageDraw.Draw(image)
    fill, s = COLORS[scene.color], scene.size * k - 1
    for x, y in scene.corners:
        x, y = x * k, y * k
        if scene.shape == "circle":
            draw.ellipse((x, y, x + s, y + s), fill=fill)
        elif scene.shape == "square":
            draw.rectangle((x, y, x + s, y + s), fill=fill)
        else:
            draw.polygon([(x + s / 2, y), (x + s, y + s), (x, y + s)], fill=fill)
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def make_scenes(n: int, seed: int) -> list[Scene]:
    rng = random.Random(seed)
    return [sample_scene(rng) for _ in range(n)]


def write_dataset(kind: str, split: str, out_dir: str | os.PathLike, n: int, seed: int | None = None) -> Path:
    """Writes ``n`` scenes as PNGs under ``out_dir/images`` plus ``out_dir/<kind>_<split>.jsonl``.

    Image paths in the JSONL are relative to its folder. The scenes depend only
    on ``split`` and ``seed`` (not on ``kind``), so the vqa/caption/dialogue
    files of one split describe the same images.
    """
    _check(kind, split)
    seed = SPLIT_SEEDS[split] if seed is None else seed
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    dialogue_rng = random.Random(seed + 7919)  # separate stream: scenes don't depend on kind
    rows = []
    for i, scene in enumerate(make_scenes(n, seed)):
        name = f"{split}-{i:05d}"
        image = f"images/{name}.png"
        render(scene).save(out / image)
        if kind == "vqa":
            rows += [
                {"id": f"{name}-{qtype}", "image": image, "question": q, "answer": a, "question_type": qtype}
                for qtype, q, a in scene.qa_pairs()
            ]
        elif kind == "caption":
            rows.append({"id": name, "image": image, "caption": scene.caption()})
        elif kind == "classification":
            rows.append({"id": name, "image": image, "label": scene.color})
        else:
            conversations = []
            for turn, (user, assistant) in enumerate(scene.dialogue(dialogue_rng)):
                user = f"<image>\n{user}" if turn == 0 else user
                conversations += [{"from": "human", "value": user}, {"from": "gpt", "value": assistant}]
            rows.append({"id": name, "image": image, "conversations": conversations})
    path = out / f"{kind}_{split}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


_SPEC = re.compile(r"synthetic:(\w+)/(\w+)(?:\?n=(\d+))?")


def parse_spec(spec: str) -> tuple[str, str, int]:
    """``"synthetic:vqa/train?n=64"`` -> ``("vqa", "train", 64)``; ``n`` defaults per split."""
    match = _SPEC.fullmatch(spec.strip())
    n = int(match[3]) if match and match[3] else None
    if not match or match[1] not in KINDS or match[2] not in SPLITS or n == 0:
        raise ValueError(
            f"bad synthetic dataset spec {spec!r}: expected 'synthetic:<kind>/<split>[?n=N]' "
            f"with kind in {'|'.join(KINDS)}, split in {'|'.join(SPLITS)} and N > 0"
        )
    return match[1], match[2], n or DEFAULT_SIZES[match[2]]


def synthetic_path(spec: str) -> Path:
    """Resolves a spec to its cached JSONL, generating it on first use.

    Safe under concurrent callers (e.g. torchrun ranks): one process generates
    into a temp folder under a file lock and renames it into place; the others
    wait for the lock and then find the finished folder.
    """
    kind, split, n = parse_spec(spec)
    final = cache_dir() / "synthetic" / DATA_VERSION / f"{kind}-{split}-n{n}"
    jsonl = f"{kind}_{split}.jsonl"
    return cached_build(final, partial(write_dataset, kind, split, n=n), marker=jsonl) / jsonl


def _check(kind: str, split: str) -> None:
    if kind not in KINDS or split not in SPLITS:
        raise ValueError(
            f"unknown synthetic kind/split {kind!r}/{split!r}: kind is one of {'|'.join(KINDS)}, "
            f"split one of {'|'.join(SPLITS)}"
        )
