"""The dtype policy: what a model loads in, which mixed precision training asks of Trainer, and the autocast that
evaluation, generation and embedding run under.

Training keeps what it trains in fp32 (finetune.adapters) over a 16-bit frozen base, and Trainer runs the forward
under autocast. Inference outside Trainer has to do the same, or a module trained in full (fp32) meets 16-bit
activations: "expected m1 and m2 to have the same dtype".
"""

from __future__ import annotations

import contextlib
import os

import torch

from finetune.errors import ConfigError

HALF = (torch.bfloat16, torch.float16)
LAUNCHED = {"bf16": torch.bfloat16, "fp16": torch.float16}  # accelerate's mixed_precision names


def choose_dtype(requested: str = "auto") -> torch.dtype:
    """`model.dtype` when given; else the mixed precision of an `accelerate launch --config_file` config; else bf16
    on a GPU that computes in bf16 natively (Ampere and newer), fp16 on older GPUs (T4, V100: emulated bf16 is slow),
    fp32 on the CPU and on Apple's MPS (ask for bfloat16 explicitly there)."""
    if requested != "auto":
        return getattr(torch, requested)
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launched in LAUNCHED:
        return LAUNCHED[launched]
    if torch.cuda.is_available():
        # The default counts emulation as support, which would give a V100 slow emulated bf16.
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.float32


def mixed_precision_arguments(dtype: torch.dtype, on_gpu: bool | None = None) -> dict:
    """The TrainingArguments that make Trainer autocast to `dtype` (and, for fp16, scale the loss)."""
    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    if dtype == torch.bfloat16:
        return {"bf16": True}
    if dtype == torch.float16:
        if not on_gpu:
            raise ConfigError("model.dtype=float16 needs a GPU: accelerate gives fp16 neither autocast nor loss scaling "
                              "on the CPU; use model.dtype=bfloat16 (or float32) here")
        return {"fp16": True}
    return {}


def compute_dtype(model) -> torch.dtype:
    """The dtype the frozen weights compute in: the 16-bit one when any parameter is 16-bit, else fp32 (a 4-bit
    layer's packed storage is not a float and does not count)."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return next((d for d in HALF if d in dtypes), torch.float32)


@contextlib.contextmanager
def inference_autocast(model):
    """Autocast to the model's 16-bit compute dtype when it has one (what Trainer does in training), without peft's
    per-call input casts (skip_adapter_input_casts); a no-op for an fp32 model, so fp32 results stay bit-for-bit
    what they were."""
    dtype = compute_dtype(model)
    if dtype == torch.float32:
        yield
        return
    from peft.helpers import disable_input_dtype_casting

    with torch.autocast(device_type=next(model.parameters()).device.type, dtype=dtype), \
            disable_input_dtype_casting(model):
        yield


def skip_adapter_input_casts(model) -> int:
    """Under autocast, peft's LoRA layers need not cast each input to the adapter's fp32 first: autocast casts
    the matmul's operands to 16-bit anyway, so the cast only costs a full-width copy per layer and call. For runs
    whose every forward is under autocast (Trainer with bf16 / fp16, and `inference_autocast`). Returns the count."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer) and hasattr(m, "cast_input_dtype_enabled")]
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    return len(layers)
