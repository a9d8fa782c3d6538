"""Peak memory of reading and checking a large LLaVA-JSON file (100,000 LLaVA-Instruct-like rows, 1-3 turns, from
benchmarks/llava_fixtures.py), each in a fresh process:

1. reading and converting every row (`load_examples`, what training and `finetune eval` do first);
2. `finetune data check` on it (the processor, the check over data.num_proc processes; no cache, so it measures).

Peak RSS is the largest of the process and its worker processes (RUSAGE_CHILDREN), in MiB.

    python benchmarks/data_memory.py [--rows 100000] [--out /tmp/finetune-bench] [--no-check]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from llava_fixtures import write_llava_json

READ = """
import resource, sys, time
from finetune.config import DataConfig
from finetune.data.dataset import load_examples
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = time.perf_counter()
examples, report = load_examples(sys.argv[1], DataConfig(), "train")
print(f"{len(examples)} examples in {time.perf_counter() - start:.1f} s; imports alone {baseline:.0f} MiB")
"""


def peak_of(command: list[str]) -> tuple[float, float, str]:
    """(peak RSS MiB of the command's largest process, seconds, its last output line), in a fresh process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak <= before:  # an earlier, bigger child set the maximum: rerun alone to know
        raise SystemExit("run each measurement in its own benchmark process (--no-check for the first)")
    return peak / 1024, seconds, done.stdout.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "finetune-bench")
    parser.add_argument("--no-check", action="store_true", help="only the read")
    parser.add_argument("--only-check", action="store_true", help="only the data check")
    args = parser.parse_args()
    path = write_llava_json(args.out, args.rows)
    print(f"{path}: {path.stat().st_size / 2**20:.0f} MiB")
    if not args.only_check:
        peak, seconds, line = peak_of([sys.executable, "-c", READ, str(path)])
        print(f"read + convert: peak {peak:.0f} MiB, {seconds:.1f} s ({line})")
    if not args.no_check:
        command = [sys.executable, "-m", "finetune", "data", "check", "demo/vqa", f"data.train={path}",
                   "data.eval=null", "data.max_length=2048", "data.cache=false"]
        peak, seconds, line = peak_of(command)
        print(f"finetune data check: peak {peak:.0f} MiB (largest process), {seconds:.1f} s ({line})")


if __name__ == "__main__":
    main()
