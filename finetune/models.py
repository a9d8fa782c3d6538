"""Load a checkpoint and its processor through the Auto classes; dtype choice and 4-bit NF4 quantization."""

from __future__ import annotations

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

log = logging.getLogger(__name__)


def choose_dtype(cfg: ModelConfig) -> torch.dtype:
    """The dtype to load in (afterwards, read `model.dtype`): `model.dtype`, else bf16/fp16 on a GPU, fp32 on CPU."""
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if torch.cuda.is_available():
        return torch.float16
    return torch.float32


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


def load_model(cfg: ModelConfig, device: str | torch.device | None = None, sharded: bool = False,
               dual_encoder: bool = False):
    """(model, processor) for a recipe's model section; the model is frozen, ready for adapters.

    `device=None` leaves placement to the caller (the Trainer moves the model); 4-bit weights are always
    placed on this process's GPU when there is one, since bitsandbytes quantizes them while loading.
    `sharded`: FSDP will shard the model, so 4-bit weights are stored in the compute dtype (FSDP shards one dtype).
    `dual_encoder`: a CLIP-style model (AutoModel) for a contrastive task, instead of a vision-language model.
    """
    name = resolve_model(cfg.name)
    processor = load_processor(cfg)
    dtype = choose_dtype(cfg)
    kwargs = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code, "dtype": dtype}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.quantization == "4bit":
        kwargs["quantization_config"] = nf4_config(name, cfg, dtype, storage=dtype if sharded else None,
                                                   dual_encoder=dual_encoder)
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": _local_device()}
    elif device is not None:
        kwargs["device_map"] = {"": device}
    with _clear_load_errors(name):
        model = (AutoModel if dual_encoder else AutoModelForImageTextToText).from_pretrained(name, **kwargs)
    model.requires_grad_(False)
    return model, processor


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
    with torch.device("meta"):
        skeleton = auto.from_config(config, trust_remote_code=cfg.trust_remote_code)
    if dual_encoder:
        return [n for n in linear_names(skeleton) if n.rsplit(".", 1)[-1] in DUAL_PROJECTIONS.values()]
    parts = find_parts(skeleton)
    return [n for n in linear_names(skeleton) if parts.part_of(n) != "decoder"]


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
