"""Load a checkpoint and its processor through the Auto classes; dtype choice and 4-bit NF4 quantization."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from finetune.config import ModelConfig
from finetune.demo import resolve_model
from finetune.errors import ConfigError, FinetuneError
from finetune.parts import DUAL_PROJECTIONS, find_parts, linear_names
from finetune.precision import choose_dtype

log = logging.getLogger(__name__)


def load_processor(cfg: ModelConfig):
    """The checkpoint's processor, with the recipe's `model.processor` options; a tokenizer without a pad
    token pads with its end-of-sequence token (batching needs one)."""
    name = resolve_model(cfg.name)
    with _clear_load_errors(name):
        processor = AutoProcessor.from_pretrained(name, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
                                                  **cfg.processor)
    tokenizer = getattr(processor, "tokenizer", processor)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return processor


def load_model(cfg: ModelConfig, device: str | torch.device | None = None, distributed: str = "single",
               dual_encoder: bool = False):
    """(model, processor) for a recipe's model section; the model is frozen, ready for adapters.

    `device=None` leaves placement to the caller (the Trainer moves the model). `distributed` is the run's
    finetune.parallelism kind, which decides how 4-bit weights load (`from_pretrained_kwargs`).
    `dual_encoder`: a CLIP-style model (AutoModel) for a contrastive task, instead of a vision-language model.
    """
    name = resolve_model(cfg.name)
    processor = load_processor(cfg)
    kwargs = from_pretrained_kwargs(cfg, name, device, distributed, dual_encoder)
    with _clear_load_errors(name):
        model = (AutoModel if dual_encoder else AutoModelForImageTextToText).from_pretrained(name, **kwargs)
    model.requires_grad_(False)
    return model, processor


def from_pretrained_kwargs(cfg: ModelConfig, name: str, device=None, distributed: str = "single",
                           dual_encoder: bool = False) -> dict:
    """from_pretrained's arguments. 4-bit weights are placed on this process's GPU while loading (bitsandbytes
    quantizes them there), except under ZeRO-3, where DeepSpeed places them and transformers refuses a device_map.
    Under FSDP and ZeRO-3 they are stored in the compute dtype: both shard one flat dtype per group."""
    dtype = choose_dtype(cfg.dtype)
    kwargs = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code, "dtype": dtype}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    sharded = distributed in ("fsdp", "deepspeed-zero3")
    if cfg.quantization == "4bit":
        kwargs["quantization_config"] = nf4_config(name, cfg, dtype, storage=dtype if sharded else None,
                                                   dual_encoder=dual_encoder)
        if torch.cuda.is_available() and distributed != "deepspeed-zero3":
            kwargs["device_map"] = {"": _local_device()}
    elif device is not None:
        kwargs["device_map"] = {"": device}
    return kwargs


def inference_device() -> str:
    """Where eval, predict and chat run: this process's GPU when there is one."""
    return f"cuda:{_local_device()}" if torch.cuda.is_available() else "cpu"


def nf4_config(name: str, cfg: ModelConfig, compute_dtype: torch.dtype, storage: torch.dtype | None = None,
               dual_encoder: bool = False):
    """NF4 + double quantization for the language decoder only.

    transformers 5 matches `llm_int8_skip_modules` from the start of the full module name or as a
    suffix, so the short name `vision_tower` matches nothing (`model.vision_tower...`) and the vision
    tower would be quantized silently. We therefore list the full dotted name of every Linear outside
    the decoder, found on a weightless (meta-device) copy of the model.
    """
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise ConfigError(
            "model.quantization=4bit needs bitsandbytes: pip install 'finetune[qlora]' (or bitsandbytes>=0.46)"
        ) from None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=storage or torch.uint8,
        llm_int8_skip_modules=modules_kept_unquantized(name, cfg, dual_encoder),
    )


def modules_kept_unquantized(name: str, cfg: ModelConfig, dual_encoder: bool = False) -> list[str]:
    """Full names of the Linears that stay 16-bit: everything outside the language decoder; for a dual encoder,
    its projection heads (the towers themselves are quantized)."""
    with _clear_load_errors(name):
        config = AutoConfig.from_pretrained(name, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    auto = AutoModel if dual_encoder else AutoModelForImageTextToText
    with torch.device("meta"), whole_weights():
        skeleton = auto.from_config(config, trust_remote_code=cfg.trust_remote_code)
    if dual_encoder:
        return [n for n in linear_names(skeleton) if n.rsplit(".", 1)[-1] in DUAL_PROJECTIONS.values()]
    parts = find_parts(skeleton)
    return [n for n in linear_names(skeleton) if parts.part_of(n) != "decoder"]


@contextlib.contextmanager
def whole_weights():
    """Models made inside load whole even under DeepSpeed ZeRO-3, where from_config partitions every new model
    (zero.Init), which fails on the meta device of a weightless skeleton. transformers' ZeRO-3 switch is the
    registered config (a weak ref), off meanwhile."""
    from transformers.integrations import deepspeed as hf_deepspeed

    registered = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = registered


def _local_device() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


class _clear_load_errors:
    """Turn from_pretrained's long tracebacks (offline, typo, private repo) into one line."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or isinstance(exc, FinetuneError):
            return False
        if isinstance(exc, ImportError) and "torchvision" in str(exc).lower():
            # Qwen2-VL / Qwen2.5-VL processors build a video processor, which needs torchvision, even when
            # only images are used; transformers offers no image-only processor for them.
            raise FinetuneError(
                f"cannot load the processor of {self.name!r}: it needs torchvision (transformers builds its video "
                "processor even for images); install the torchvision build that matches your torch"
            ) from None
        if isinstance(exc, (OSError, ValueError, KeyError)):
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            local = Path(self.name).exists()
            fix = (
                "check the folder holds config.json, the weights and the processor files"
                if local
                else "check the Hub id for typos; offline, download it first "
                "(huggingface-cli download ID) or pass a local folder"
            )
            raise FinetuneError(f"cannot load model {self.name!r}: {first} ({fix})") from None
        return False
