"""Run under ``torchrun --nproc_per_node 2``: DDP with the gathered contrastive loss equals one process seeing all rows.

For a tiny random CLIPModel and SiglipModel, and for an even (3 + 3) and an
uneven (2 + 4) split of a 6-pair batch, each rank wraps the model in DDP (gloo,
CPU), computes :func:`finetune.contrastive.contrastive_loss` on its own rows
and back-propagates. The reference is the model's own
``forward(return_loss=True)`` on all 6 pairs in one process, with no
distributed code of ours involved. Compared: the loss (mean over ranks), every
parameter gradient after DDP's averaging, and the gradient reaching each
rank's own image/text features (divided by the world size, as DDP divides
parameter gradients), all in float64. As a negative control, DDP with the
model's own per-process loss (no gather) is recorded too. Each rank writes the
largest differences to ``<out_dir>/rank<r>.json``.
"""

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

from finetune.contrastive import contrastive_loss

TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
N, LENGTH, IMAGE = 6, 7, 16


def make_model(kind: str):
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float64)  # so that float32 rounding cannot hide a small error
    text = {**TOWER, "vocab_size": 50, "max_position_embeddings": LENGTH}
    vision = {**TOWER, "image_size": IMAGE, "patch_size": 8}
    if kind == "clip":
        return CLIPModel(CLIPConfig(text_config={**text, "eos_token_id": 49}, vision_config=vision, projection_dim=24))
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
    with torch.no_grad():  # away from SiglipModel's random init, so both terms matter
        model.logit_scale.fill_(2.0)
        model.logit_bias.fill_(-3.0)
    return model


def make_batch():
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 49, (N, LENGTH), generator=gen)
    input_ids[:, -1] = 49  # CLIP pools at the eos token
    return {"input_ids": input_ids, "pixel_values": torch.randn(N, 3, IMAGE, IMAGE, generator=gen)}


def reference(model, batch):
    """One process, all rows, transformers' own loss; gradients of the parameters and of the raw features."""
    out = model(**batch, return_loss=True)
    image, text = out.vision_model_output.pooler_output, out.text_model_output.pooler_output
    image.retain_grad()
    text.retain_grad()
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return out.loss.detach(), grads, image.grad, text.grad


def check(kind: str, sizes: list[int]) -> dict[str, float]:
    rank, world = dist.get_rank(), dist.get_world_size()
    model, batch = make_model(kind), make_batch()
    ref_loss, ref_grads, ref_image_grad, ref_text_grad = reference(copy.deepcopy(model), batch)

    start = sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])
    # Through DDP's forward: its reducer only averages gradients of what its forward computed.
    ddp = DistributedDataParallel(model)  # kept alive: its reducer does the averaging during backward
    out = ddp(**{k: v[rows] for k, v in batch.items()})
    # The raw (unnormalised) features: contrastive_loss normalises them itself.
    image, text = out.vision_model_output.pooler_output, out.text_model_output.pooler_output
    image.retain_grad()
    text.retain_grad()
    loss = contrastive_loss(image, text, model.logit_scale, getattr(model, "logit_bias", None))
    loss.backward()
    losses = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(losses, loss.detach())
    return {
        "loss": abs(torch.stack(losses).mean() - ref_loss).item(),
        "loss_value": ref_loss.item(),
        "param_grad": max((p.grad - ref_grads[n]).abs().max().item() for n, p in model.named_parameters()),
        "param_grad_scale": max(g.abs().max().item() for g in ref_grads.values()),
        "image_grad": (image.grad / world - ref_image_grad[rows]).abs().max().item(),
        "text_grad": (text.grad / world - ref_text_grad[rows]).abs().max().item(),
        "param_grad_without_gather": local_only(kind, batch, rows, ref_grads),
    }


def local_only(kind, batch, rows, ref_grads) -> float:
    """Negative control: DDP with the model's own loss on local rows (no gather) must NOT match."""
    model = make_model(kind)
    ddp = DistributedDataParallel(model)
    ddp(**{k: v[rows] for k, v in batch.items()}, return_loss=True).loss.backward()
    return max((p.grad - ref_grads[n]).abs().max().item() for n, p in model.named_parameters())


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    results = {f"{kind} {sizes}": check(kind, sizes) for kind in ("clip", "siglip") for sizes in ([3, 3], [2, 4])}
    Path(out_dir, f"rank{dist.get_rank()}.json").write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
