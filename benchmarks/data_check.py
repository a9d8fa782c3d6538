"""The up-front data check at scale: LLaVA-JSON rows with 640x480 JPEGs (benchmarks/llava_fixtures.py), the embedded
tiny-llava processor.

Prints, for 2,000 and 20,000 rows: rows/s of the first check (image headers, token formula, data.num_proc
processes) next to the old way (every row fully encoded, images decoded: measured on the first 2,000 rows), rows/s
of the cached check, and for 20,000 rows the wall time of `finetune train ... train.max_steps=1` with the check
cached against the same command on a 1-row dataset (model load, one step and the run folder are in both).

    python benchmarks/data_check.py [--out /tmp/finetune-bench] [--rows 2000 20000] [--no-train]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from llava_fixtures import write_llava_json

from finetune.config import load_recipe
from finetune.data import check_cache
from finetune.data.dataset import check_examples
from finetune.data.encode import make_encoder
from finetune.data.measure import Measurer
from finetune.models import load_processor

MAX_LENGTH = 2048  # the fixtures' rows fit (demo/vqa's 256 would cut most of them)


def check(path: Path, **overrides) -> tuple[float, int]:
    recipe = load_recipe("demo/vqa", {"data.train": str(path), "data.max_length": MAX_LENGTH, **overrides})
    encoder = make_encoder(load_processor(recipe.model), recipe.data.max_length)
    start = time.perf_counter()
    _, _, report = check_examples(recipe.data.train, recipe.data, encoder, progress=False)
    return time.perf_counter() - start, report.rows


def old_way(path: Path, rows: int) -> float:
    """Every example encoded in full (image decoded, resized, normalised): what the check did before."""
    from finetune.data.dataset import load_examples

    recipe = load_recipe("demo/vqa", {"data.train": str(path), "data.max_length": MAX_LENGTH})
    encoder = make_encoder(load_processor(recipe.model), MAX_LENGTH)
    examples = load_examples(str(path), recipe.data, "train")[0][:rows]
    start = time.perf_counter()
    for example in examples:
        encoder.encode(example)
    return len(examples) / (time.perf_counter() - start)


def train_seconds(data: Path, out: Path) -> float:
    command = [sys.executable, "-m", "finetune", "train", "demo/vqa", f"data.train={data}", "data.eval=null",
               f"data.max_length={MAX_LENGTH}", "train.max_steps=1", "train.save_strategy=no",
               "eval.before_after=false", "eval.report_examples=0", f"output_dir={out}"]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "finetune-bench")
    parser.add_argument("--rows", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--no-train", action="store_true", help="skip the time-to-first-step runs")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{cores} cores; data.num_proc default = {cores}; data.max_length={MAX_LENGTH}")
    paths = {rows: write_llava_json(args.out, rows) for rows in args.rows}
    with tempfile.TemporaryDirectory() as checks:
        check_cache.checks_dir = lambda: Path(checks)  # a fresh cache: the first pass really is the first
        for rows, path in paths.items():
            first, n = check(path)
            cached, _ = check(path)
            print(f"{rows:>6} rows  first check {first:6.2f} s ({n / first:7.0f} rows/s)   "
                  f"cached {cached:6.2f} s ({n / cached:8.0f} rows/s)")
    sample = min(paths)
    print(f"old check (full encode, images decoded), first {sample} rows: {old_way(paths[sample], sample):.0f} rows/s")
    recipe = load_recipe("demo/vqa", {"data.max_length": MAX_LENGTH})
    print(f"token formula in use: {Measurer(make_encoder(load_processor(recipe.model), MAX_LENGTH)).formula}")
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    if args.no_train:
        return
    big = paths[max(paths)]
    one = args.out / "one_row.json"
    one.write_text(json.dumps(json.loads(big.read_text())[:1]))
    train_seconds(big, args.out / "run-fill")  # fills the cache for the big file (its first check)
    empty = min(train_seconds(one, args.out / "run-one") for _ in range(2))
    cached = min(train_seconds(big, args.out / "run-big") for _ in range(2))
    print(f"finetune train ... train.max_steps=1: 1-row dataset {empty:.1f} s, {max(paths)} rows (cached check) "
          f"{cached:.1f} s: +{cached - empty:.1f} s")


if __name__ == "__main__":
    main()
