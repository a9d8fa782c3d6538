"""LLaVA-Instruct-like data for the benchmarks: a JSON list of rows with 1-3 human/gpt turns about one image each,
the images 640x480 JPEGs of which a few hundred distinct files repeat (the check's cost per row does not depend
on whether an image repeats: nothing is cached across rows but the file's size, as real datasets repeat images
too). Answers run 40-800 characters like LLaVA-Instruct-150K's conversation / detail / reasoning parts; the words
are drawn at random, so no two rows share their strings.

    python benchmarks/llava_fixtures.py OUT_FOLDER ROWS [--images 300]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

WORDS = ("the", "a", "image", "shows", "man", "woman", "dog", "cat", "bus", "street", "table", "red", "blue",
         "green", "small", "large", "two", "three", "on", "in", "next", "to", "with", "near", "sitting",
         "standing", "holding", "wearing", "white", "black", "background", "people", "car", "tree", "sky",
         "building", "window", "food", "plate", "cup", "kitchen", "room", "field", "water", "boat", "train",
         "sign", "light", "wall", "floor", "bed", "chair")
QUESTIONS = ("What is {}?", "Where is the {}?", "What color is the {}?", "How many {} are there?",
             "Describe the {} in detail.", "Why might the {} be here?")


def write_images(folder: Path, count: int, size: tuple[int, int] = (640, 480)) -> list[str]:
    """`count` distinct JPEGs of noise (noise compresses like photos do, ~150 KB at 640x480); kept if present."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for i in range(count):
        name = f"{i:06d}.jpg"
        if not (folder / name).exists():
            pixels = (rng.random((size[1], size[0], 3)) * 255).astype("uint8")
            Image.fromarray(pixels).save(folder / name, quality=85)
        names.append(name)
    return names


def rows(count: int, images: list[str], seed: int = 0):
    """LLaVA-format rows, one at a time."""
    rng = random.Random(seed)

    def words(low: int, high: int) -> str:
        text, target = [], rng.randint(low, high)
        while sum(len(w) + 1 for w in text) < target:
            text.append(rng.choice(WORDS))
        return " ".join(text)

    for i in range(count):
        turns = []
        for t in range(rng.randint(1, 3)):
            question = rng.choice(QUESTIONS).format(words(3, 20))
            turns.append({"from": "human", "value": ("<image>\n" if t == 0 else "") + question})
            turns.append({"from": "gpt", "value": words(40, 800).capitalize() + "."})
        yield {"id": f"{i:012d}", "image": f"images/{images[i % len(images)]}", "conversations": turns}


def write_llava_json(folder: Path, count: int, distinct_images: int = 300) -> Path:
    """folder/llava_{count}.json (kept if present) with its images in folder/images."""
    names = write_images(folder / "images", distinct_images)
    path = folder / f"llava_{count}.json"
    if not path.exists():
        with open(path.with_suffix(".tmp"), "w") as out:
            out.write("[")
            out.writelines(("," if i else "") + json.dumps(row) for i, row in enumerate(rows(count, names)))
            out.write("]")
        path.with_suffix(".tmp").rename(path)
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("rows", type=int)
    parser.add_argument("--images", type=int, default=300)
    args = parser.parse_args()
    print(write_llava_json(args.out, args.rows, args.images))
