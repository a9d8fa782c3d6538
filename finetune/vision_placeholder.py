"""Text-only batches: the vision tower still runs, once, on a placeholder image.

A sharded model gathers each wrapped module's weights when that module runs (FSDP, ZeRO-3), ZeRO-2 reduces
gradients in buckets sized for every trained parameter, and every process must make the same collectives in the
same order. A process whose batch has no image skips the vision tower, its gathers and its gradients: the processes then wait on each other forever, or pair the wrong tensors (the hang reported against
ms-swift#4918, LLaMA-Factory#5648 and DeepSpeed#7170). Here the vision tower runs on a placeholder image just
before the language decoder, where a batch with images runs it, and its output joins the decoder's input embeddings
times zero, as real image features join them: forward and backward then make the same collectives in the same
order, and the gradients are exactly those of the text. The same keeps a text-only batch trainable when the
projector is the only part trained (LLaVA's stage 1): its loss would otherwise reach no trained weight, and DDP
would wait for the projector's gradients.
"""

from __future__ import annotations

import inspect
import logging

import torch
from PIL import Image

from finetune.data.formats import row_to_examples
from finetune.precision import compute_dtype

log = logging.getLogger(__name__)


class VisionPlaceholder:
    @classmethod
    def for_model(cls, model, encoder) -> VisionPlaceholder | None:
        """None, with a warning, for a model whose vision tower cannot be run apart (no get_image_features)."""
        try:
            return cls(model, encoder)
        except (AttributeError, ValueError, TypeError) as err:
            log.warning("text-only batches will skip the vision tower (%s): under FSDP / DeepSpeed keep an image in "
                        "every batch", err)
            return None

    def __init__(self, model, encoder):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.model = model
        self.image_features = base.get_image_features
        wanted = set(inspect.signature(self.image_features).parameters)
        example = row_to_examples({"image": "placeholder.png", "question": "?", "answer": "."})[0]
        features = encoder.encode(example, images=[Image.new("RGB", (64, 64), "white")])
        self.inputs = {k: v if torch.is_tensor(v) else torch.tensor(v) for k, v in features.items() if k in wanted}
        if "pixel_values" not in self.inputs:
            raise ValueError(f"{type(base).__name__}: its get_image_features takes no pixel_values")
        base.get_decoder().register_forward_pre_hook(self._before_decoder, with_kwargs=True)
        self.armed = False

    def arm(self, batch: dict) -> None:
        """Called before each forward: a batch without pixel values runs the placeholder."""
        self.armed = batch.get("pixel_values") is None

    def _before_decoder(self, module, args, kwargs):
        if not self.armed:
            return None
        self.armed = False
        embeds = kwargs.get("inputs_embeds")
        if not torch.is_tensor(embeds):
            raise ValueError(f"{type(module).__name__} is called without inputs_embeds: no place for the placeholder")
        device, dtype = embeds.device, compute_dtype(self.model)
        inputs = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in self.inputs.items()}
        zero = sum((t.sum() * 0 for t in _tensors(self.image_features(**inputs)) if t.is_floating_point()),
                   torch.zeros((), device=device))
        return args, {**kwargs, "inputs_embeds": embeds + zero.to(embeds.dtype)}


def _tensors(value):
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
