"""Build a folder once into the cache, safely across processes: lock, build in a temp folder, rename."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock


def cache_dir() -> Path:
    return Path(os.environ.get("FINETUNE_CACHE") or Path.home() / ".cache" / "finetune")


def cached_build(final: Path, build: Callable[[Path], None], marker: str) -> Path:
    """`final`, built by `build(tmp_folder)` on first use. `marker` is a file inside it whose presence
    means the folder is complete. Concurrent callers (torchrun ranks, parallel tests) wait on a lock
    and find the finished folder; readers never see half a folder because it appears by one rename."""
    if (final / marker).exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if not (final / marker).exists():
            tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}-"))
            try:
                tmp.chmod(0o755)  # mkdtemp's 0700 would lock other users out of a shared cache
                build(tmp)
                os.replace(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return final
