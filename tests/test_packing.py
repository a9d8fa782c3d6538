"""Packed batches (several examples per row, positions restarting, no attention mask) train exactly like padded
ones: the same per-example losses and the same gradients, images on their own examples; families that cannot
pack pad instead. Plus the length-grouped sampler that makes batches of neighbours in length."""

from types import SimpleNamespace

import pytest
import torch
from families import twin
from PIL import Image
from transformers import AutoModelForImageTextToText, Qwen2VLConfig
from transformers.masking_utils import find_packed_sequence_indices

from finetune.config import ModelConfig, load_recipe
from finetune.data.collate import Collator, first_fit
from finetune.data.encode import IGNORE, make_encoder
from finetune.data.formats import row_to_examples
from finetune.data.packing import PACKING, packing_layout
from finetune.data.sampler import LengthGroupedSampler
from finetune.errors import ConfigError
from finetune.models import load_processor

TURNS = [{"from": "human", "value": "<image>\nWhat color is the cat?"}, {"from": "gpt", "value": "It is red."},
         {"from": "human", "value": "How many are there?"}, {"from": "gpt", "value": "Two. A cat sits on a red sofa."}]
ROWS = [  # mixed lengths, three images of different sizes and colours, one text-only row
    {"image": "a.png", "conversations": TURNS},
    {"image": "b.png", "question": "What is in the picture?", "answer": "Yes."},
    {"conversations": [{"from": "human", "value": "Is the sky blue?"}, {"from": "gpt", "value": "Yes, it is sunny."}]},
    {"image": "c.png", "question": "How many dogs are there?", "answer": "Two dogs play in the park."},
    {"image": "a.png", "question": "Is it sunny?", "answer": "No."},
]
IMAGES = {"a.png": ((64, 48), (200, 40, 40)), "b.png": ((90, 200), (40, 200, 40)), "c.png": ((120, 30), (40, 40, 200))}


def features(folder):
    encoder = make_encoder(load_processor(ModelConfig(name=str(folder))), 4096)
    out = []
    for row in ROWS:
        example = row_to_examples(row)[0]
        images = [Image.new("RGB", *IMAGES[name]) for name in example.images]
        out.append(encoder.encode(example, images=images))
    return encoder, out


def per_example_losses(model, batch, feats):
    """Each example's mean loss over its own supervised tokens, found by its input_ids wherever the batch put it:
    at a row's start or where the positions restart (a packed row), padding or not after it."""
    logits = model(**batch).logits.float()
    rows = batch["input_ids"].tolist()
    starts = [(r, i) for r, positions in enumerate(batch["position_ids"].tolist()) for i, p in enumerate(positions)
              if p == 0] if "position_ids" in batch else [(r, 0) for r in range(len(rows))]
    losses = []
    for f in feats:
        ids, n = f["input_ids"], len(f["input_ids"])
        (r, s), = [(r, s) for r, s in starts if rows[r][s : s + n] == ids]
        losses.append(torch.nn.functional.cross_entropy(logits[r, s : s + n - 1], batch["labels"][r, s + 1 : s + n],
                                                        ignore_index=IGNORE))
    return torch.stack(losses)


def compare(folder, layouts=("rows", "flat")):
    encoder, feats = features(folder)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    model.train()
    padded = Collator(encoder.pad_token_id)(feats)
    base = per_example_losses(model, padded, feats)
    model(**padded).loss.backward()
    base_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for layout in layouts:
        model.zero_grad()
        packed = Collator(encoder.pad_token_id, layout)(feats)
        assert "attention_mask" not in packed and packed["input_ids"].shape[0] < len(feats)
        assert torch.allclose(per_example_losses(model, packed, feats), base, atol=1e-5), layout
        model(**packed).loss.backward()
        for name, grad in base_grads.items():
            got = dict(model.named_parameters())[name].grad
            assert torch.allclose(got, grad, atol=1e-6, rtol=1e-4), (layout, name)
    return model, encoder, feats, base


def test_packed_rows_give_the_same_per_example_loss_and_gradients(random_tiny):
    model, encoder, feats, base = compare(random_tiny)
    # The check sees a leak: with the decoder's cache on, transformers skips the packed-sequence mask.
    packed = Collator(encoder.pad_token_id, "flat")(feats)
    packed["use_cache"] = True
    assert not torch.allclose(per_example_losses(model, packed, feats), base, atol=1e-3)


@pytest.mark.parametrize("name", ["llava-1.5", "llava-next-mistral", "smolvlm"])
def test_families_that_pack_give_the_same_losses(name, tmp_path_factory):
    folder = twin(name, tmp_path_factory)
    compare(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder)
    assert packing_layout("auto", model) == "rows"


def test_gemma3_falls_back_to_padding(tmp_path_factory, caplog):
    folder = twin("gemma3", tmp_path_factory)
    model = AutoModelForImageTextToText.from_pretrained(folder)
    with caplog.at_level("INFO", logger="finetune.data.packing"):
        assert packing_layout("auto", model) is None
    assert "bidirectional" in caplog.text
    with pytest.raises(ConfigError, match="cannot pack"):
        packing_layout(True, model)
    # Why: its image tokens' bidirectional mask reaches across packed examples, so a packed row changes a loss.
    encoder, feats = features(folder)
    model.train()
    padded = per_example_losses(model, Collator(encoder.pad_token_id)(feats), feats)
    packed = per_example_losses(model, Collator(encoder.pad_token_id, "flat")(feats), feats)
    assert not torch.allclose(padded, packed, atol=1e-5)
    # The padded batch the run uses instead keeps its attention mask.
    assert "attention_mask" in Collator(encoder.pad_token_id, packing_layout("auto", model))(feats)


def test_rows_of_one_example_run_causal_attention_without_a_mask(random_tiny, monkeypatch):
    """Length-grouped batches mostly hold one example per row. The padding then continues each row's positions, so
    transformers finds no packed sequence and builds no mask: sdpa runs causal (skipping the masked-off half), and
    the losses are still the padded batch's. A row of two examples still gets the mask that keeps them apart."""
    encoder, feats = features(random_tiny)
    model = AutoModelForImageTextToText.from_pretrained(random_tiny, dtype=torch.float32, attn_implementation="sdpa")
    model.train()
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, attn_mask=None, is_causal=False, **kwargs):
        calls.append((attn_mask is None, is_causal))
        return sdpa(*args, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    apart = [feats[1], feats[3], feats[4]]  # 87, 103 and 85 tokens: no two fit in a row of 103
    batch = Collator(encoder.pad_token_id, "rows")(apart)
    assert batch["input_ids"].shape[0] == 3 and "attention_mask" not in batch
    assert find_packed_sequence_indices(batch["position_ids"]) is None
    losses = per_example_losses(model, batch, apart)
    assert (True, True) in calls and all(no_mask for no_mask, _ in calls)  # decoder causal, vision tower unmasked
    assert torch.allclose(losses, per_example_losses(model, Collator(encoder.pad_token_id)(apart), apart), atol=1e-5)
    calls.clear()
    per_example_losses(model, Collator(encoder.pad_token_id, "rows")(feats), feats)  # 28 + 103 share a row
    assert (False, False) in calls


def test_no_example_is_a_target_of_the_one_before(random_tiny):
    """Fully supervised rows (labels = input_ids): an example's first token is never predicted from the previous
    example's last, so the batch loss is the padded batch's."""
    encoder, feats = features(random_tiny)
    feats = [{**f, "labels": list(f["input_ids"])} for f in feats]
    model = AutoModelForImageTextToText.from_pretrained(random_tiny)
    model.train()
    padded = model(**Collator(encoder.pad_token_id)(feats)).loss
    for layout in ("rows", "flat"):
        assert torch.allclose(model(**Collator(encoder.pad_token_id, layout)(feats)).loss, padded, atol=1e-5)


def test_mrope_families_and_unknown_types_pad():
    def stub(config, attention="sdpa"):
        config.get_text_config()._attn_implementation = attention
        return SimpleNamespace(config=config)

    qwen = stub(Qwen2VLConfig())
    assert packing_layout("auto", qwen) is None and "mrope" in PACKING["qwen2_vl"]
    with pytest.raises(ConfigError, match="mrope"):
        packing_layout("true", qwen)
    assert packing_layout(False, qwen) is None
    unknown = stub(Qwen2VLConfig())
    unknown.config.model_type = "some_new_vlm"
    assert packing_layout("auto", unknown) is None
    assert packing_layout(True, unknown) == "rows"  # asked for on a family nobody checked: a warning, then packed


def test_layout_follows_the_attention_implementation(random_tiny):
    model = AutoModelForImageTextToText.from_pretrained(random_tiny)
    for attention, layout in (("sdpa", "rows"), ("eager", "rows"), ("flash_attention_2", "flat"),
                              ("flex_attention", "flat"), ("paged|sdpa", None)):
        model.config.get_text_config()._attn_implementation = attention
        assert packing_layout("auto", model) == layout, attention
    with pytest.raises(ConfigError, match="paged"):
        packing_layout(True, model)  # the last one: no packed-sequence mask
    assert packing_layout(False, model) is None


def test_first_fit_rows_and_positions(random_tiny):
    encoder, feats = features(random_tiny)
    rows = first_fit(feats)
    longest = max(len(f["input_ids"]) for f in feats)
    assert all(sum(len(f["input_ids"]) for f in row) <= longest for row in rows)
    assert sorted(id(f) for row in rows for f in row) == sorted(id(f) for f in feats)
    batch = Collator(encoder.pad_token_id, "rows")(feats)
    assert batch["input_ids"].shape == (len(rows), longest) and batch["use_cache"] is False
    for r, row in enumerate(rows):
        start = 0
        for f in row:
            n = len(f["input_ids"])
            assert batch["position_ids"][r, start : start + n].tolist() == list(range(n))
            assert batch["input_ids"][r, start : start + n].tolist() == f["input_ids"]
            assert batch["labels"][r, start] == IGNORE
            assert batch["labels"][r, start + 1 : start + n].tolist() == f["labels"][1:]
            start += n
        assert (batch["labels"][r, start:] == IGNORE).all()
    # Images follow the examples in packed order (FFD reorders them by length).
    ordered = [f for row in rows for f in row if "pixel_values" in f]
    assert torch.equal(batch["pixel_values"], torch.cat([f["pixel_values"] for f in ordered]))
    assert [id(f) for f in ordered] != [id(f) for f in feats if "pixel_values" in f]


def test_recipe_key():
    assert load_recipe("demo/vqa").data.packing == "auto"
    assert load_recipe("demo/vqa", ["data.packing=false"]).data.packing is False
    assert load_recipe("demo/vqa", {"data.packing": "true"}).data.packing is True
    with pytest.raises(ConfigError, match="data.packing"):
        load_recipe("demo/vqa", ["data.packing=always"])


def test_sampler_batches_neighbours_in_length():
    torch.manual_seed(0)
    lengths = torch.randint(80, 600, (257,)).tolist()
    sampler = LengthGroupedSampler(lengths, 8, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(257)) and len(sampler) == 257
    batches = [order[i : i + 8] for i in range(0, 257, 8)]
    assert len(batches[-1]) == 1  # the short batch is last, so the others stay whole
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # the longest first
    padding = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    assert padding / sum(max(lengths[i] for i in b) * len(b) for b in batches) < 0.05
    # Batches come in random order, not longest to shortest, and a new epoch draws a new order.
    firsts = [lengths[b[0]] for b in batches[1:-1]]
    assert firsts != sorted(firsts, reverse=True)
    assert list(sampler) == order  # drawn from seed + epoch, not from torch's global generator
    sampler.set_epoch(1)
    assert list(sampler) != order
    sampler.set_epoch(0)
    assert list(sampler) == order
