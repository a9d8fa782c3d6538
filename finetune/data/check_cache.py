"""The data check's results, cached across runs: what each example measured (tokens, or why it is unusable).

Key: the data's content fingerprint, the processor's saved files, the code that turns rows into tokens, and the
data.* keys that change examples. Image files are not part of the key (hashing them would cost what the check
saves); each example's images are re-stat'ed on every run instead, and an example whose image changed size or
modification time, or disappeared, is measured again.

Processes on one machine share the cache folder: under torchrun / accelerate only local rank 0 measures while the
others wait for its file, and any other concurrent runs wait on a file lock rather than measuring twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from filelock import FileLock, Timeout

from finetune.data.images import image_file
from finetune.demo.cache import cache_dir

log = logging.getLogger(__name__)
FORMAT = 1  # bump when the file layout changes
# A waiting rank computes the check itself when its local rank 0 has held no lock and written no file for this long
# (a cache folder rank 0 cannot write, for instance).
WAIT_GRACE_S = 60.0
POLL_S = 0.25
# The modules whose code decides what a row measures: a change to any of them is a new key.
_CODE = ("finetune.data.encode", "finetune.data.formats", "finetune.data.images", "finetune.data.measure",
         "finetune.data.sources", "finetune.quirks")


def checks_dir() -> Path:
    return cache_dir() / "checks"


def cache_key(source_fingerprint: str, processor, settings: dict) -> str:
    """The cache file's name for this data, processor and settings (everything that changes a measure)."""
    import PIL
    import tokenizers
    import transformers

    digest = hashlib.blake2b(digest_size=16)
    for part in (f"format {FORMAT}", source_fingerprint, processor_fingerprint(processor), _code_fingerprint(),
                 json.dumps(settings, sort_keys=True, default=str),
                 f"{transformers.__version__} {tokenizers.__version__} {PIL.__version__}"):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()


def processor_fingerprint(processor) -> str:
    """A hash of the processor's saved files: tokenizer, chat template, image-processor settings (incl. the
    recipe's model.processor options, which land in them)."""
    digest = hashlib.blake2b(digest_size=16)
    with tempfile.TemporaryDirectory() as folder:
        processor.save_pretrained(folder)
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def file_fingerprint(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _code_fingerprint() -> str:
    import importlib

    digest = hashlib.blake2b(digest_size=16)
    for name in _CODE:
        digest.update(Path(importlib.import_module(name).__file__).read_bytes())
    return digest.hexdigest()


def image_signatures(examples) -> np.ndarray:
    """Per example, a number that changes when any of its image files changes size or modification time."""
    stats: dict = {}
    signatures = np.zeros(len(examples), dtype=np.int64)
    for i, example in enumerate(examples):
        if not example.images:
            continue
        parts = []
        for value in example.images:
            path = image_file(value, example.root or Path.cwd())
            if path is None:
                continue
            if path not in stats:
                try:
                    found = os.stat(path)
                    stats[path] = (found.st_size, found.st_mtime_ns)
                except OSError:
                    stats[path] = (-1, -1)
            parts.append(stats[path])
        signatures[i] = hash(tuple(parts)) & 0x7FFF_FFFF_FFFF_FFFF  # a tuple of ints hashes the same in every process
    return signatures


class CheckCache:
    """One data source's cached results: `measured(examples, measure)` returns them, measuring only what is new."""

    def __init__(self, key: str):
        self.path = checks_dir() / f"{key}.npz"
        self.lock = FileLock(str(self.path) + ".lock")

    def measured(self, examples, measure) -> list:
        """(code, tokens, reason) per example; `measure(indices)` measures the given examples."""
        signatures = image_signatures(examples)
        results = self._load(len(examples))
        if results is None and _waits_for_local_rank_0():
            results = self._wait(len(examples))
        if results is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.lock:
                results = self._load(len(examples))  # another process may have written it while we waited
                if results is None:
                    results = measure(list(range(len(examples))))
                    self._save(results, signatures)
                    return results
        stored, old = results
        stale = np.flatnonzero(old != signatures).tolist()
        if stale:
            log.info("data check: %d example(s) whose images changed are checked again", len(stale))
            for index, result in zip(stale, measure(stale)):
                stored[index] = result
            self._save(stored, signatures)
        return stored

    def _load(self, count: int):
        try:
            with np.load(self.path, allow_pickle=False) as data:
                codes, tokens, signatures = data["codes"], data["tokens"], data["signatures"]
                reasons = {int(i): reason for i, reason in json.loads(str(data["reasons"]))}
        except (OSError, KeyError, ValueError):  # none yet, or unreadable: measure again
            return None
        if len(codes) != count:
            return None
        results = [(int(c), int(t), reasons.get(i)) for i, (c, t) in enumerate(zip(codes.tolist(), tokens.tolist()))]
        return results, signatures

    def _save(self, results: list, signatures: np.ndarray) -> None:
        reasons = json.dumps([[i, reason] for i, (_, _, reason) in enumerate(results) if reason is not None])
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".check-", suffix=".npz")
            with os.fdopen(handle, "wb") as out:
                np.savez(out, codes=np.array([c for c, _, _ in results], dtype=np.uint8),
                         tokens=np.array([t for _, t, _ in results], dtype=np.int64),
                         signatures=signatures, reasons=np.array(reasons))
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from the other users of a shared cache
            os.replace(tmp, self.path)  # readers see the old file or the new one, never half of one
        except OSError as err:
            log.warning("data check: cannot write the cache %s (%s); the next run checks again", self.path, err)

    def _wait(self, count: int):
        """Local rank 0 measures; wait for its file (or measure here if it has written nothing for a while)."""
        idle_since = time.monotonic()
        while True:
            results = self._load(count)
            if results is not None:
                return results
            try:
                with self.lock.acquire(timeout=0):
                    if time.monotonic() - idle_since > WAIT_GRACE_S:
                        return None
            except Timeout:  # rank 0 holds the lock: it is measuring
                idle_since = time.monotonic()
            time.sleep(POLL_S)


def _waits_for_local_rank_0() -> bool:
    return int(os.environ.get("LOCAL_RANK", "0")) != 0 and int(os.environ.get("LOCAL_WORLD_SIZE",
                                                                            os.environ.get("WORLD_SIZE", "1"))) > 1
