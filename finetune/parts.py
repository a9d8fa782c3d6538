"""Find a vision-language model's parts (vision tower, projector, language decoder, lm_head) by inspection.

No table of model families: the decoder is whatever `get_decoder()` returns, lm_head is the output
embedding, the projector is the non-decoder module whose name says it connects the two
(LLaVA `multi_modal_projector`, Idefics3 `connector`, Qwen2-VL `visual.merger`), and the rest of the
non-decoder modules are the vision tower. An unseen family with the usual names works unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

PROJECTOR_NAME = re.compile(r"(^|\.)(multi_modal_projector|mm_projector|projector|connector|merger|aligner)$")


@dataclass
class Parts:
    decoder: str  # module name prefix of the language decoder
    projectors: list[str]
    lm_head: str | None
    vision: list[str]  # top-level vision modules (with the projector inside them excluded by `part_of`)

    def part_of(self, module_name: str) -> str:
        """`decoder`, `projector`, `lm_head`, `vision` or `other` for a module name."""
        if _under(module_name, self.decoder):
            return "decoder"
        if any(_under(module_name, p) for p in self.projectors):
            return "projector"
        if self.lm_head and _under(module_name, self.lm_head):
            return "lm_head"
        if any(_under(module_name, v) for v in self.vision):
            return "vision"
        return "other"


def find_parts(model: nn.Module) -> Parts:
    names = {id(module): name for name, module in model.named_modules()}
    decoder = names.get(id(model.get_decoder())) if hasattr(model, "get_decoder") else None
    if not decoder:
        raise ValueError(f"{type(model).__name__}: cannot find its language decoder (get_decoder())")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    lm_head = names.get(id(head)) if head is not None else None
    projectors = [n for n in names.values() if PROJECTOR_NAME.search(n) and not _under(n, decoder)]
    # Keep only the outermost match (a projector may contain a sub-module also called `projector`).
    projectors = [p for p in projectors if not any(p != q and _under(p, q) for q in projectors)]
    # The vision tower: siblings of the decoder that are neither the decoder nor a projector.
    parent = decoder.rpartition(".")[0]
    siblings = [n for n in names.values() if n and n.rpartition(".")[0] == parent]
    vision = [n for n in siblings if n != decoder and n not in projectors and n != lm_head]
    return Parts(decoder=decoder, projectors=projectors, lm_head=lm_head, vision=vision)


# Dual encoders (CLIPModel, SiglipModel, Siglip2Model): two towers side by side, no decoder.
DUAL_TOWERS = {"vision": "vision_model", "text": "text_model"}
DUAL_PROJECTIONS = {"vision": "visual_projection", "text": "text_projection"}  # CLIP's heads (SigLIP has none)
ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "out_proj")
MLP_LINEARS = ("fc1", "fc2")


def is_dual_encoder(model: nn.Module) -> bool:
    """A contrastive image-text model: embeds both modalities and compares them with a learned scale."""
    return all(hasattr(model, name) for name in ("get_text_features", "get_image_features", "logit_scale"))


def dual_encoder_tower(module_name: str) -> str | None:
    """`vision` or `text` for a module inside one of a dual encoder's towers or heads, else None."""
    parts = module_name.split(".")
    for tower, name in DUAL_TOWERS.items():
        if name in parts or DUAL_PROJECTIONS[tower] in parts:
            return tower
    return None


def linear_names(model: nn.Module) -> list[str]:
    """Names of every nn.Linear (bitsandbytes' Linear4bit is one) in the model."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")
