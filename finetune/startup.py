"""What the `finetune` command settles before the heavy libraries load: which optional ones stay out, and which of
their start-up notices are noise.

peft imports bitsandbytes whenever it is installed (peft.helpers at import, LoRA's layer dispatch when adapters
are attached), and bitsandbytes pulls in torch's compiler stack: about a second of start-up, and a notice about an
optional Hub kernel on CPU machines, for runs that never quantize. So a command whose recipe does not ask for
4-bit marks bitsandbytes as absent (`sys.modules[name] = None`, Python's documented way to make an import fail);
peft and transformers then see it as not installed, as they would on a machine without it.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

BITSANDBYTES = "bitsandbytes"
# transformers imports DeepSpeed whenever it is installed (its integration checks at import), which takes a second
# and, on a machine without a GPU, prints "Setting accelerator to CPU" on stdout, into `$(finetune configs --path)`
# and JSON output alike. Runs that do not use DeepSpeed mark it absent, as bitsandbytes.
DEEPSPEED = "deepspeed"


class _HubKernelNotice(logging.Filter):
    """bitsandbytes' CPU backend says at import that an optional Hub kernel (package `kernels`) is missing, then
    uses its own CPU kernel: the notice is noise to users, so this one record is dropped and nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


def quiet_optional_kernel_notice() -> None:
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _HubKernelNotice) for f in logger.filters):
        logger.addFilter(_HubKernelNotice())
    # peft asks transformers 5 for `is_gradient_checkpointing`, which warns it was renamed: a note to peft's
    # authors that every run would print; only this one warning is silenced.
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def skip_bitsandbytes_unless_needed(target: str | None, overrides: list[str] | None = None) -> bool:
    """Mark bitsandbytes absent for this process when the recipe (or the run folder's recipe.yaml) plus overrides
    plainly does not quantize; True when it did. Unknown recipes (a Hub id, a typo) change nothing."""
    if target is None:
        return False
    quantization = _quantization(target, overrides or [])
    if quantization is None or quantization == "4bit":
        return False
    return skip_bitsandbytes()


def skip_bitsandbytes() -> bool:
    """Mark bitsandbytes absent for this process (unless something imported it already); True when it did."""
    return _mark_absent(BITSANDBYTES)


def skip_deepspeed_unless_needed(target: str | None, overrides: list[str] | None = None) -> bool:
    """Mark DeepSpeed absent unless the run asks for it: `train.deepspeed` in the recipe or the overrides, or an
    `accelerate launch` DeepSpeed config; True when it did."""
    from finetune.parallelism import deepspeed_stage

    if deepspeed_stage() is not None:
        return False
    if target is not None:
        raw = _raw_recipe(target, overrides or [])
        if raw is None or (raw.get("train") or {}).get("deepspeed"):
            return False
    return _mark_absent(DEEPSPEED)


def _mark_absent(name: str) -> bool:
    if name in sys.modules:  # imported already: too late
        return False
    sys.modules[name] = None
    return True


def _quantization(target: str, overrides: list[str]) -> str | None:
    """model.quantization, read without validating the recipe (validation imports transformers)."""
    from finetune.config import parse_overrides

    try:
        if "model.quantization" in (given := parse_overrides(overrides)):
            return str(given["model.quantization"])
    except Exception:  # noqa: BLE001 - a malformed override is load_recipe's to explain, later
        return None
    raw = _raw_recipe(target, overrides)
    if raw is None:
        return None
    model = raw.get("model")
    return str(model.get("quantization", "none")) if isinstance(model, dict) else "none"


def _raw_recipe(target: str, overrides: list[str]) -> dict | None:
    """The recipe (or a run folder's recipe.yaml) as a plain dict with the overrides applied; None if unreadable."""
    from finetune.config import _set_dotted, find_recipe, parse_overrides, parse_yaml

    try:
        override = parse_overrides(overrides)
        path = Path(target)
        raw = parse_yaml((path / "recipe.yaml").read_text() if path.is_dir() else find_recipe(target).read_text())
    except Exception:  # noqa: BLE001 - an unreadable recipe is load_recipe's to explain, later
        return None
    if not isinstance(raw, dict):
        return None
    try:
        for key, value in override.items():
            _set_dotted(raw, key, value)
    except Exception:  # noqa: BLE001 - as above
        return None
    return raw
