"""Whether a model trains on packed batches (several examples per row, no padding between them), as data.

A packed row carries `position_ids` that restart at 0 for every example and no `attention_mask`; transformers'
masking utils then find the example boundaries from the positions (`find_packed_sequence_indices`) and keep every
example from attending to another, for eager, sdpa and flex attention; flash-attention kernels do the same from
the positions (varlen), but only for a batch of one row. A family packs only where that is all it takes.
"""

from __future__ import annotations

import logging

from finetune.errors import ConfigError

log = logging.getLogger(__name__)

MROPE = "its rotary positions are 3-D (mrope, from get_rope_index over the whole row), not one position per token"
BIDIRECTIONAL = ("its image (or prefix) tokens attend bidirectionally through token_type_ids, a mask built per row "
                 "that packed examples leak through")

# config.model_type -> None: packed rows give the same per-example loss and gradients as padded ones (checked in
# tests/test_packing.py on a model of the family), or why packing would be wrong. Types not listed pad.
PACKING = {
    "llava": None,
    "llava_next": None,
    "idefics3": None,  # SmolVLM: pixel_values are rows x images, but the model flattens them and drops the padding
    "qwen2_vl": MROPE,
    "qwen2_5_vl": MROPE,
    "qwen3_vl": MROPE,
    "qwen3_vl_moe": MROPE,
    "glm4v": MROPE,
    "gemma3": BIDIRECTIONAL,  # measured on the twin: one packed row changes an example's loss
    "paligemma": BIDIRECTIONAL,
    "mllama": "its cross-attention layers read each row's own images (images batched per row, not per example)",
}

# How rows are filled, by attention implementation. "flat": the whole batch in one row (varlen flash kernels
# and flex attention's block mask skip the masked-off blocks, so one long row costs what its examples cost).
# "rows": first-fit into rows no longer than the batch's longest example (eager and sdpa build a dense
# row x row mask, so a longer row would cost more attention than the padding it saves).
LAYOUT = {"eager": "rows", "sdpa": "rows", "flex_attention": "flat", "flash_attention_2": "flat",
          "flash_attention_3": "flat"}


def packing_layout(setting: str | bool, model) -> str | None:
    """`data.packing` (auto | true | false) for this model: "rows", "flat", or None to pad."""
    setting = str(setting).lower()
    if setting == "false":
        return None
    config = model.config
    family = config.model_type
    attention = config.get_text_config()._attn_implementation or "eager"
    layout = LAYOUT.get(attention) or ("flat" if "flash" in attention else None)
    reason = PACKING.get(family, f"packing is not verified for model type {family!r}")
    if layout is None:
        reason = f"attention implementation {attention!r} has no packed-sequence mask"
    if reason is None:
        log.info("packing examples into rows (%s attention: %s)", attention, layout)
        return layout
    if setting == "true" and (family in PACKING or layout is None):  # known to be wrong: refuse
        raise ConfigError(f"data.packing=true: {family} cannot pack examples: {reason}; use data.packing=auto")
    if setting == "true":  # a family nobody has checked: the user asked for it
        log.warning("data.packing=true on %s: %s; packing anyway", family, reason)
        return layout
    log.info("padding batches, not packing: %s", reason)
    return None
