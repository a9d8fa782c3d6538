"""The embedded demo world: tiny checkpoints built offline and synthetic data, reached through one resolver.

The core never imports the builders directly: a recipe's `model.name` and `data.train`/`data.eval` pass
through `resolve_model` / `resolve_data`, which only import torch-heavy builders when a demo name is used.
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path

# Embedded checkpoint name -> "module:function" returning its cached folder (built on first use).
EMBEDDED_MODELS = {"tiny-llava": "finetune.demo.tiny:tiny_llava_path", "tiny-clip": "finetune.demo.tiny_clip:tiny_clip_path"}
SYNTHETIC_PREFIX = "synthetic:"


def is_embedded_model(name: str | None) -> bool:
    return name in EMBEDDED_MODELS


def resolve_model(name: str) -> str:
    """An embedded name becomes its cached folder; anything else (Hub id, local folder) passes through."""
    if name not in EMBEDDED_MODELS:
        return name
    module, function = EMBEDDED_MODELS[name].split(":")
    return str(getattr(import_module(module), function)())


def is_synthetic(spec: str | None) -> bool:
    return bool(spec) and str(spec).startswith(SYNTHETIC_PREFIX)


def resolve_data(spec: str) -> Path:
    """`synthetic:KIND/SPLIT[?n=N]` -> the cached JSONL file (generated on first use)."""
    from finetune.demo.synthetic import synthetic_path

    return synthetic_path(spec)
