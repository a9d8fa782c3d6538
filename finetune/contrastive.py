"""Dual-encoder (CLIP / SigLIP) embeddings and contrastive losses, on one process or many.

The loss is picked from the model: a model with a learned ``logit_bias``
(SiglipModel, Siglip2Model) trains with SigLIP's pairwise sigmoid loss, any
other (CLIPModel) with CLIP's symmetric InfoNCE. On one process both equal the
``loss`` that the model's own ``forward(return_loss=True)`` returns (tested).

Under torchrun / accelerate (``torch.distributed`` initialised, world size > 1)
each process gathers the other processes' embeddings *with gradients*, so every
image is contrasted with every text of the global batch, and the loss is scaled
so that DDP's gradient averaging yields exactly the gradient of one process
seeing the whole batch (derivation in :func:`contrastive_loss`).

Written here rather than taken from open_clip: its ``ClipLoss``/``SigLipLoss``
work on open_clip's own models and bring open_clip and its dependencies along.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F

# Keyword arguments of get_image_features / get_text_features across CLIP, SigLIP and SigLIP 2.
IMAGE_INPUTS = ("pixel_values", "pixel_attention_mask", "spatial_shapes", "interpolate_pos_encoding")
TEXT_INPUTS = ("input_ids", "attention_mask", "position_ids")


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Unit L2 norm along the last dimension, written as the models write it."""
    return x / x.norm(p=2, dim=-1, keepdim=True)


def _pooled(out) -> torch.Tensor:
    # transformers 5 returns a BaseModelOutputWithPooling whose pooler_output is the
    # projected embedding; transformers 4 returned the tensor itself.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def embed_images(model, batch) -> torch.Tensor:
    """Normalised image embeddings from a CLIPModel / SiglipModel / Siglip2Model (or a PeftModel around one)."""
    return normalize(_pooled(model.get_image_features(**{k: batch[k] for k in IMAGE_INPUTS if k in batch})))


def embed_texts(model, batch) -> torch.Tensor:
    """Normalised text embeddings; the same vectors the model's forward compares."""
    return normalize(_pooled(model.get_text_features(**{k: batch[k] for k in TEXT_INPUTS if k in batch})))


def embed(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image_embeds, text_embeds)``, both normalised, for a processor batch holding both modalities."""
    return embed_images(model, batch), embed_texts(model, batch)


def clamp_logit_scale(model, maximum: float = math.log(100)) -> None:
    """CLIP's training keeps the temperature at most 100 (open_clip and the paper do the same)."""
    core = getattr(model, "module", model)
    scale = getattr(core, "logit_scale", None)
    if scale is not None and not uses_sigmoid_loss(core):
        with torch.no_grad():
            scale.clamp_(max=maximum)


def uses_sigmoid_loss(model) -> bool:
    """SigLIP-style models carry a learned ``logit_bias``; CLIP-style ones do not."""
    return getattr(model, "logit_bias", None) is not None


def dual_encoder_loss(model, batch) -> torch.Tensor:
    """The model's own training loss on ``batch`` (global across processes when distributed).

    Goes through ``model(...)``, not ``get_*_features``: DDP averages gradients
    only in a backward that follows its own forward. ``model`` may be a CLIP /
    SigLIP / SigLIP 2 model, a PeftModel around one, or either wrapped in DDP.
    """
    out = model(**{k: batch[k] for k in (*IMAGE_INPUTS, *TEXT_INPUTS) if k in batch})
    core = getattr(model, "module", model)  # DDP keeps the model in .module; PeftModel forwards attributes
    bias = core.logit_bias if uses_sigmoid_loss(core) else None
    return contrastive_loss(out.image_embeds, out.text_embeds, core.logit_scale, bias)


def contrastive_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """CLIP's InfoNCE (``logit_bias is None``) or SigLIP's sigmoid loss; row i of each input is a matching pair.

    ``logit_scale`` is the model's parameter as stored, in log space: logits are
    ``cos * logit_scale.exp() (+ logit_bias)``, as in CLIPModel / SiglipModel. The
    embeddings are normalised here (a no-op for the output of :func:`embed`), so
    raw projections may be passed too.

    Distributed scaling. Let W processes hold n_r rows each, N = sum n_r, and L the
    loss of one process that sees all N rows:

    * CLIP: L = 1/(2N) [sum over images i of CE(i vs all texts) + sum over texts t
      of CE(t vs all images)]. Each term belongs to one row, so process r takes
      its own rows against all gathered columns: S_r = sum_{local i} CE_i +
      sum_{local t} CE_t, and L = 1/(2N) sum_r S_r.
    * SigLIP: L = 1/N sum over all N*N (image, text) pairs of -log sigmoid(+-logit).
      Local images against all texts cover every pair exactly once:
      L = 1/N sum_r S_r with S_r the sum over local images x all texts.

    The gather's backward sums, on the process that owns a row, the gradient
    every process's S_r sends to that row, so process r's parameter gradient
    is d(sum_r' loss_r')/dtheta through its own rows; DDP then averages over
    W. Returning loss_r = (W / N) * S_r (CLIP: W / (2N)) makes that average
    (1/W) * d(sum_r' loss_r') = d(1/N sum S_r') = dL, and the mean of the
    W returned values is L itself. With equal local batches W / N = 1 / n_r: the
    local mean, exactly the one-process formula.
    """
    image_embeds, text_embeds = normalize(image_embeds), normalize(text_embeds)
    if image_embeds.shape[0] != text_embeds.shape[0]:
        raise ValueError(f"{image_embeds.shape[0]} images but {text_embeds.shape[0]} texts: rows must be pairs")
    scale = logit_scale.exp()
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if logit_bias is None:
        if world == 1:
            # Same operand order as CLIPModel.forward + image_text_contrastive_loss.
            logits_per_text = text_embeds @ image_embeds.t() * scale
            return (_infonce(logits_per_text) + _infonce(logits_per_text.t())) / 2
        all_images, offset, total = _gather_with_grad(image_embeds)
        all_texts, _, _ = _gather_with_grad(text_embeds)
        targets = torch.arange(image_embeds.shape[0], device=image_embeds.device) + offset
        image_rows = image_embeds @ all_texts.t() * scale
        text_rows = text_embeds @ all_images.t() * scale
        summed = F.cross_entropy(image_rows, targets, reduction="sum") + F.cross_entropy(
            text_rows, targets, reduction="sum"
        )
        return summed * (world / (2 * total))
    if world == 1:
        # SiglipModel.forward: rows are texts, summed over images, averaged over texts.
        logits_per_text = text_embeds @ image_embeds.t() * scale + logit_bias
        return -F.logsigmoid(_signs(logits_per_text, 0) * logits_per_text).sum(dim=-1).mean()
    all_texts, offset, total = _gather_with_grad(text_embeds)
    logits = image_embeds @ all_texts.t() * scale + logit_bias  # local images x all texts
    return -F.logsigmoid(_signs(logits, offset) * logits).sum() * (world / total)


def _infonce(logits: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device))


def _signs(logits: torch.Tensor, offset: int) -> torch.Tensor:
    """+1 on the matching pairs (row i, column offset + i), -1 elsewhere."""
    signs = -torch.ones_like(logits)
    rows = torch.arange(logits.shape[0], device=logits.device)
    signs[rows, rows + offset] = 1.0
    return signs


def _gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Every process's rows in rank order (gradients flow back to their owners), this rank's offset, the total.

    Local batches may differ in size (the last batch of an epoch): rows are padded
    to the largest for the collective, and the padding is cut off again.
    """
    from torch.distributed.nn.functional import all_gather

    rank, world = dist.get_rank(), dist.get_world_size()
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    padded = F.pad(x, (0, 0, 0, max(sizes) - x.shape[0]))
    with warnings.catch_warnings():
        # torch 2.13 marks it deprecated in favour of torch.distributed._functional_collectives
        # (a private module); it is the public autograd-aware gather in every torch >= 2.4.
        warnings.simplefilter("ignore", FutureWarning)
        parts = all_gather(padded)
    rows = torch.cat([part[:n] for part, n in zip(parts, sizes)])
    return rows, sum(sizes[:rank]), sum(sizes)
