"""LoRA targets resolved by inspecting the loaded model, and attaching them with peft."""

from __future__ import annotations

import logging
import re

import torch
from peft import LoraConfig, get_peft_model

from finetune.config import AdapterConfig
from finetune.errors import ConfigError
from finetune.lora_dropout import use_cpu_dropout
from finetune.lora_forward import use_fused_lora_forward
from finetune.parts import (
    ATTENTION_LINEARS,
    DUAL_PROJECTIONS,
    MLP_LINEARS,
    Parts,
    dual_encoder_tower,
    find_parts,
    is_dual_encoder,
    linear_names,
)

log = logging.getLogger(__name__)

PART_ALIASES = {"projector": "projector", "vision_tower": "vision", "vision": "vision", "lm_head": "lm_head"}
DUAL_SCALARS = ("logit_scale", "logit_bias")  # a dual encoder's learned temperature and (SigLIP) bias


def lora_targets(model, cfg: AdapterConfig, parts: Parts | None = None) -> list[str]:
    """Full names of the Linear layers that get LoRA.

    `auto`: every Linear in the projector and the language decoder (attention and MLP), plus the
    vision tower's when `adapter.vision_tower` is on; for a dual encoder, the attention projections (and with
    `adapter.mlp` the MLPs) of both towers, less the towers in `adapter.freeze`. A list: regexes searched in the
    full names.
    """
    names = linear_names(model)
    if cfg.targets == "auto" and is_dual_encoder(model):
        layers = ATTENTION_LINEARS + (MLP_LINEARS if cfg.mlp else ())
        return [n for n in names if n.rsplit(".", 1)[-1] in layers
                and dual_encoder_tower(n) not in (None, *cfg.freeze)]
    parts = parts or find_parts(model)
    if cfg.targets == "auto":
        wanted = {"projector", "decoder"} | ({"vision"} if cfg.vision_tower else set())
        return [n for n in names if parts.part_of(n) in wanted]
    patterns = [cfg.targets] if isinstance(cfg.targets, str) else cfg.targets
    chosen = [n for n in names if any(re.search(p, n) for p in patterns)]
    if not chosen:
        raise ConfigError(f"adapter.targets {patterns} match no Linear layer (e.g. {names[:3]})")
    return chosen


def fully_trained_modules(model, cfg: AdapterConfig, parts: Parts | None = None) -> list[str]:
    """Module names for `adapter.train_fully` (peft's modules_to_save): part aliases or module names. A dual
    encoder's projection heads are always trained fully, but for frozen towers."""
    all_names = {name for name, _ in model.named_modules()}
    if is_dual_encoder(model):
        heads = [name for tower, name in DUAL_PROJECTIONS.items() if name in all_names and tower not in cfg.freeze]
        unknown = [item for item in cfg.train_fully if item not in all_names]
        if unknown:
            raise ConfigError(f"adapter.train_fully: {unknown[0]!r} is not a module name of this dual encoder")
        return heads + [item for item in cfg.train_fully if item not in heads]
    parts = parts or find_parts(model)
    chosen = []
    for item in cfg.train_fully:
        part = PART_ALIASES.get(item)
        if part == "projector":
            chosen += parts.projectors
        elif part == "vision":
            chosen += parts.vision
        elif part == "lm_head" and parts.lm_head:
            chosen.append(parts.lm_head)
        elif item in all_names:
            chosen.append(item)
        else:
            raise ConfigError(
                f"adapter.train_fully: {item!r} is neither a part ({', '.join(PART_ALIASES)}) nor a module name"
            )
    return chosen


def attach_adapters(model, cfg: AdapterConfig, gradient_checkpointing: bool = False):
    """Wrap the frozen model in a PeftModel; returns it with a one-line trainable/total report logged.

    What is not trained keeps the dtype it was loaded in (under QLoRA the vision tower, projector and lm_head stay
    16-bit: peft's prepare_model_for_kbit_training would cast them to fp32, ~1.2 GB more on LLaVA-7B); what is
    trained is fp32 whatever the model's dtype, so AdamW's small updates do not round away in bf16 and fp16 mixed
    precision can unscale its gradients."""
    if gradient_checkpointing:
        # With the frozen embeddings, checkpointed blocks would see no input that requires grad and send
        # no gradient to the adapters inside them.
        model.enable_input_require_grads()
    dual = is_dual_encoder(model)
    parts = None if dual else find_parts(model)
    full = fully_trained_modules(model, cfg, parts)
    targets = lora_targets(model, cfg, parts)
    targets = [t for t in targets if not any(t == f or t.startswith(f + ".") for f in full)]
    if not cfg.lora:
        # peft needs at least one LoRA layer; with adapter.lora=false we add a rank-1 one on a single
        # decoder Linear and freeze it at zero (B starts at 0), so the run stays a standard PEFT adapter.
        targets = targets[:1]
    if not targets:
        raise ConfigError("no Linear layer left for LoRA; check adapter.targets and adapter.train_fully")
    lora = LoraConfig(
        r=cfg.r if cfg.lora else 1,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        use_dora=cfg.use_dora,
        use_rslora=cfg.use_rslora,
        target_modules=targets,
        modules_to_save=full or None,
        bias="none",
    )
    model = get_peft_model(model, lora)
    use_cpu_dropout(model)
    use_fused_lora_forward(model)
    if not cfg.lora:
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.requires_grad_(False)
    if dual:
        # CLIP's temperature (and SigLIP's bias) learn too; peft does not save bare parameters, so the run
        # folder keeps them in logit_scale.safetensors (finetune.run).
        for name in DUAL_SCALARS:
            if getattr(model.get_base_model(), name, None) is not None:
                getattr(model.get_base_model(), name).requires_grad_(True)
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    trainable, total = count_parameters(model)
    log.info(
        "trainable parameters: %s of %s (%.2f%%); LoRA on %d layers, trained fully: %s",
        f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1), len(targets) if cfg.lora else 0,
        ", ".join(full) or "none",
    )
    return model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total); 4-bit weights count as their unpacked size, like peft's own report."""
    trainable, total = model.get_nb_trainable_parameters()
    return int(trainable), int(total)
