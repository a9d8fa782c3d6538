"""The up-front data check's pass over every example: from the cache when possible, else over worker processes.

Workers are forked, so they share the parent's examples and probed Measurer instead of receiving copies; where
fork is not the platform's way (macOS, Windows) the pass runs in the one process.
"""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm

from finetune.config import DataConfig
from finetune.data.check_cache import CheckCache, cache_key
from finetune.data.formats import Example
from finetune.data.measure import Measurer
from finetune.data.sources import Rows
from finetune.errors import DataError


def measure_examples(examples: list[Example], encoder, cfg: DataConfig, rows: Rows | None = None, source: str = "",
                     split: str = "train", progress: bool = True) -> list[tuple[int, int, str | None]]:
    """(OK | TOO_LONG | UNUSABLE, tokens, reason) per example: from the cache when this data, processor and these
    settings were checked before (data.cache), else measured over data.num_proc processes."""
    measurer = _Lazy(encoder)

    def measure(indices: list[int]) -> list:
        if not indices:
            return []
        return _measure_all(measurer.get(), [examples[i] for i in indices], cfg.num_proc, source, progress,
                            cfg.cache)

    if not cfg.cache or rows is None or not examples:
        return measure(list(range(len(examples))))
    settings = {"split": split, "root": str(examples[0].root), "max_length": encoder.max_length,
                "encoder": type(encoder).__name__, "format": cfg.format, "columns": cfg.columns, "prompt": cfg.prompt,
                "system_prompt": cfg.system_prompt}
    try:
        key = cache_key(rows.fingerprint(), encoder.processor, settings)
    except DataError:  # a source without a fingerprint: nothing to key a cache on
        return measure(list(range(len(examples))))
    return CheckCache(key).measured(examples, measure)


class _Lazy:
    """The Measurer, built on first use (a cached run needs none, and building one probes the processor)."""

    def __init__(self, encoder):
        self.encoder, self.measurer = encoder, None

    def get(self) -> Measurer:
        if self.measurer is None:
            self.measurer = Measurer(self.encoder)
        return self.measurer


CHUNK = 256  # examples per task handed to a worker process
_WORK: tuple | None = None  # (measurer, examples) for forked workers, which inherit it instead of unpickling it


def _measure_all(measurer: Measurer, examples: list[Example], num_proc: int | None, source: str,
                 progress: bool, cache: bool = False) -> list:
    """Measure in chunks, over worker processes where there are enough examples and the platform forks."""
    global _WORK
    starts = list(range(0, len(examples), CHUNK))
    # By default the machine's cores, shared by the processes of a torchrun / accelerate launch that all check
    # (data.cache=false; with the cache only local rank 0 does).
    shared = not cache or int(os.environ.get("LOCAL_RANK", "0")) != 0
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if shared else 1
    procs = min(num_proc or max(1, _cores() // local), len(starts))
    bar = tqdm(total=len(examples), desc=f"checking {source}", disable=not progress, unit="ex", leave=False)
    results: list = [None] * len(examples)
    if procs <= 1 or sys.platform != "linux":  # fork keeps the examples shared; spawn would copy them all
        for start in starts:
            results[start : start + CHUNK] = measurer.measure(examples[start : start + CHUNK])
            bar.update(min(CHUNK, len(examples) - start))
        bar.close()
        return results
    import multiprocessing

    _WORK = (measurer, examples)
    # Workers tokenize one batch at a time each; the tokenizer's own thread pool would only compete with them.
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        with multiprocessing.get_context("fork").Pool(procs) as pool:
            for start, chunk, full in pool.imap_unordered(_measure_chunk, starts):
                results[start : start + len(chunk)] = chunk
                measurer.full_encodes += full
                bar.update(len(chunk))
    finally:
        _WORK = None
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before
        bar.close()
    return results


def _measure_chunk(start: int):
    measurer, examples = _WORK
    before = measurer.full_encodes
    chunk = measurer.measure(examples[start : start + CHUNK])
    return start, chunk, measurer.full_encodes - before


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
