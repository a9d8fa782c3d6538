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
    if BITSANDBYTES in sys.modules:
        return False
    sys.modules[BITSANDBYTES] = None
    return True


def _quantization(target: str, overrides: list[str]) -> str | None:
    """model.quantization, read without validating the recipe (validation imports transformers)."""
    from finetune.config import find_recipe, parse_overrides, parse_yaml

    try:
        override = parse_overrides(overrides)
        if "model.quantization" in override:
            return str(override["model.quantization"])
        path = Path(target)
        raw = parse_yaml((path / "recipe.yaml").read_text() if path.is_dir() else find_recipe(target).read_text())
    except Exception:  # noqa: BLE001 - an unreadable recipe is load_recipe's to explain, later
        return None
    model = raw.get("model") if isinstance(raw, dict) else None
    if not isinstance(model, dict):
        return "none" if isinstance(raw, dict) else None
    return str(model.get("quantization", "none"))
