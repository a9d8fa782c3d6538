"""finetune.contrastive against transformers' own CLIP / SigLIP / SigLIP 2 losses, on one process and on two."""

import json
import subprocess
import sys
from pathlib import Path

import dual_encoders
import pytest
import torch
from transformers import AutoModel, AutoProcessor
from transformers.models.clip import modeling_clip

from finetune.contrastive import (
    contrastive_loss,
    dual_encoder_loss,
    embed,
    embed_images,
    embed_texts,
    normalize,
    uses_sigmoid_loss,
)
from finetune.demo import synthetic

KINDS = ("clip", "siglip", "siglip2")


@pytest.fixture(scope="module", params=KINDS)
def pair(request, tmp_path_factory):
    folder = getattr(dual_encoders, f"build_{request.param}")(tmp_path_factory.mktemp(request.param))
    model, processor = AutoModel.from_pretrained(folder), AutoProcessor.from_pretrained(folder)
    if request.param != "clip":
        with torch.no_grad():  # SiglipModel's init is randn: fix them where both loss terms matter
            model.logit_scale.fill_(1.5)
            model.logit_bias.fill_(-2.0)
    return request.param, model, processor


def batch_of(processor, n=5):
    scenes = synthetic.make_scenes(n, seed=7)
    return processor(
        text=[s.caption() for s in scenes],
        images=[synthetic.render(s) for s in scenes],
        padding="max_length",  # SigLIP pools the last position: trained with fixed-length texts
        truncation=True,
        max_length=24,
        return_tensors="pt",
    )


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_loss_and_gradients_equal_the_models_own(pair):
    kind, model, processor = pair
    batch = batch_of(processor)
    model.zero_grad()
    theirs = model(**batch, return_loss=True).loss
    theirs.backward()
    their_grads = grads(model)
    model.zero_grad()
    ours = dual_encoder_loss(model, batch)
    ours.backward()
    our_grads = grads(model)
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-6)
    assert our_grads.keys() == their_grads.keys() and "logit_scale" in our_grads
    assert ("logit_bias" in our_grads) == (kind != "clip") == uses_sigmoid_loss(model)
    for name, grad in their_grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_embed_gives_the_normalised_embeddings_the_model_compares(pair):
    _, model, processor = pair
    batch = batch_of(processor)
    with torch.no_grad():
        out = model(**batch)
        images, texts = embed(model, batch)
    torch.testing.assert_close(images, out.image_embeds)
    torch.testing.assert_close(texts, out.text_embeds)
    torch.testing.assert_close(images.norm(dim=-1), torch.ones(len(images)))
    # One modality at a time, as evaluation embeds them.
    with torch.no_grad():
        torch.testing.assert_close(embed_images(model, batch), images)
        text_only = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        torch.testing.assert_close(embed_texts(model, text_only), texts)


def test_clip_loss_is_transformers_image_text_contrastive_loss():
    gen = torch.Generator().manual_seed(0)
    images, texts = torch.randn(7, 16, generator=gen), torch.randn(7, 16, generator=gen)
    scale = torch.tensor(2.6592)
    logits_per_text = normalize(texts) @ normalize(images).t() * scale.exp()
    expected = modeling_clip.image_text_contrastive_loss(logits_per_text)  # clip_loss before transformers 5
    assert contrastive_loss(images, texts, scale).item() == pytest.approx(expected.item(), abs=1e-6)
    # Normalised inside: raw projections and unit vectors give the same loss.
    assert contrastive_loss(normalize(images), normalize(texts), scale).item() == pytest.approx(expected.item())


def test_siglip_loss_counts_every_pair():
    """SigLIP's loss is the sum over all image-text pairs of -log sigmoid(+-logit), divided by the batch size."""
    gen = torch.Generator().manual_seed(0)
    images, texts = normalize(torch.randn(4, 8, generator=gen)), normalize(torch.randn(4, 8, generator=gen))
    scale, bias = torch.tensor(1.0), torch.tensor(-3.0)
    logits = images @ texts.t() * scale.exp() + bias
    by_hand = sum(
        -torch.nn.functional.logsigmoid(logits[i, j] if i == j else -logits[i, j]) for i in range(4) for j in range(4)
    )
    assert contrastive_loss(images, texts, scale, bias).item() == pytest.approx(by_hand.item() / 4, abs=1e-6)


def test_mismatched_rows_are_refused():
    with pytest.raises(ValueError, match="pairs"):
        contrastive_loss(torch.randn(3, 4), torch.randn(2, 4), torch.tensor(0.0))


@pytest.mark.slow  # two torchrun processes: 7 s on an idle 2-core machine, 20-26 s on a busy one
def test_two_processes_match_one_process_seeing_the_whole_batch(tmp_path):
    """torchrun, 2 processes (gloo, CPU), DDP: loss and every gradient equal the one-process reference."""
    script = Path(__file__).with_name("contrastive_ddp.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    run = subprocess.run([*cmd, str(tmp_path)], check=False, capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).parents[1])  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    for rank in (0, 1):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert set(results) == {"clip [3, 3]", "clip [2, 4]", "siglip [3, 3]", "siglip [2, 4]"}
        for case, diff in results.items():
            assert diff["loss"] < 1e-9 * diff["loss_value"], case
            assert diff["param_grad"] < 1e-9 * diff["param_grad_scale"], case
            assert diff["image_grad"] < 1e-12 and diff["text_grad"] < 1e-12, case
            # Without the gather, DDP averages per-process losses: a different gradient.
            assert diff["param_grad_without_gather"] > 1e-3 * diff["param_grad_scale"], case


def test_siglip_with_a_sentencepiece_tokenizer_loads_and_matches(tmp_path):
    """Real SigLIP checkpoints ship a sentencepiece SiglipTokenizer: needs the sentencepiece and protobuf packages."""
    pytest.importorskip("sentencepiece")
    pytest.importorskip("google.protobuf")
    folder = dual_encoders.build_siglip(tmp_path, tokenizer="sentencepiece")
    model, processor = AutoModel.from_pretrained(folder), AutoProcessor.from_pretrained(folder)
    assert type(processor.tokenizer).__name__ == "SiglipTokenizer"
    batch = batch_of(processor)
    with torch.no_grad():
        assert dual_encoder_loss(model, batch).item() == pytest.approx(model(**batch, return_loss=True).loss.item())
