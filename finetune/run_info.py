"""run_info.json: what the run folder's other files do not say (parameter counts, wall time, hardware,
versions), written once by training so the report can be rebuilt from the folder alone."""

from __future__ import annotations

import json
import os
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from finetune.adapters import count_parameters


def write_run_info(out: Path, model, started: datetime, seconds: float, world_size: int = 1,
                   parallelism: str = "single") -> Path:
    trainable, total = count_parameters(model)
    info = {
        "trainable_parameters": trainable,
        "total_parameters": total,
        "seconds": round(seconds, 1),
        "hardware": hardware(world_size),
        "parallelism": parallelism,  # finetune.parallelism.KINDS
        "world_size": world_size,
        "started": started.isoformat(timespec="seconds"),
        "finetune_version": _version("finetune"),
        "torch_version": torch.__version__,
        "transformers_version": _version("transformers"),
    }
    path = Path(out) / "run_info.json"
    path.write_text(json.dumps(info, indent=2) + "\n")
    return path


def hardware(world_size: int = 1) -> str:
    """"NVIDIA H100 80GB HBM3 x2" or "CPU (2 cores)"; x N counts the training processes."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} x{world_size}"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"CPU ({cores} cores)" + (f" x{world_size} processes" if world_size > 1 else "")


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None
