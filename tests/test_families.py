"""The family matrix: every real family's twin (its own classes, processor and published chat template) is
encoded, trained, generated from and merged the way the toolkit does it, on single-image, multi-turn, text-only
and system-prompt rows. Facts each family must satisfy come from tests/families.py."""

import importlib.util
import json
import math
import os

import pytest
import torch
from families import FAMILIES, twin
from labels import supervised_runs
from PIL import Image
from transformers import AutoModelForImageTextToText

from finetune.config import AdapterConfig, ModelConfig
from finetune.data.collate import Collator
from finetune.data.encode import make_encoder
from finetune.data.formats import row_to_examples
from finetune.errors import FinetuneError
from finetune.generation import answer_text, generate, greedy_config, stop_token_ids
from finetune.models import load_processor

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
NAMES = list(FAMILIES)
CHAT_FAMILIES = [n for n in NAMES if FAMILIES[n].chat_template is not None]
REPLIES = ["It is red.", "Two of them.", "Yes, on the left."]


def rows(family):
    """Single-image VQA, multi-turn with the image first, text-only, and a row with a system prompt."""
    vqa = {"image": "a.png", "question": "What color is the cat?", "answer": REPLIES[0]}
    turns = [{"from": "human", "value": "<image>\nWhat color is the cat?"}, {"from": "gpt", "value": REPLIES[0]},
             {"from": "human", "value": "How many are there?"}, {"from": "gpt", "value": REPLIES[1]},
             {"from": "human", "value": "Where are they?"}, {"from": "gpt", "value": REPLIES[2]}]
    text_only = {"conversations": [{"from": "human", "value": "Is the sky blue?"}, {"from": "gpt", "value": "Yes."}]}
    system = {"image": "a.png", "conversations": [{"from": "system", "value": "Answer briefly."}, *turns[:2]]}
    return {"vqa": vqa, "multi-turn": {"image": "a.png", "conversations": turns}, "text-only": text_only,
            "system": system}


def image(family):
    return Image.new("RGB", family.image_size, (200, 40, 40))


def open_processor(name, tmp_path_factory):
    """The processor as the toolkit loads it; Qwen2-VL's needs torchvision (a clear error without it)."""
    family = FAMILIES[name]
    folder = twin(name, tmp_path_factory)
    if family.needs_torchvision and not HAS_TORCHVISION:
        pytest.skip("no torchvision here: test_qwen_without_torchvision_is_one_clear_line covers this machine")
    return folder, load_processor(ModelConfig(name=str(folder)))


@pytest.mark.parametrize("name", [n for n in NAMES if FAMILIES[n].needs_torchvision])
def test_qwen_without_torchvision_is_one_clear_line(name, tmp_path_factory):
    """Run where torchvision is absent: a child process in which importing it fails, as on a machine without it."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['torchvision'] = None\n"
            "from finetune.config import ModelConfig\nfrom finetune.errors import FinetuneError\n"
            "from finetune.models import load_processor\n"
            "try:\n    load_processor(ModelConfig(name=sys.argv[1]))\nexcept FinetuneError as err:\n    print(err)")
    done = subprocess.run([sys.executable, "-c", code, str(twin(name, tmp_path_factory))], capture_output=True,
                          text=True, timeout=300, check=False, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    message = done.stdout.strip()
    assert "needs torchvision" in message and "install the torchvision build" in message
    assert len(message.splitlines()) == 1


def encoded(family, processor, kind):
    encoder = make_encoder(processor, max_length=4096)
    example = row_to_examples(rows(family)[kind])[0]
    return encoder, encoder.encode(example, images=[image(family)] * len(example.images))


@pytest.mark.parametrize("kind", ["vqa", "multi-turn", "text-only", "system"])
@pytest.mark.parametrize("name", CHAT_FAMILIES)
def test_replies_and_their_end_of_turn_are_supervised_and_bos_is_there_once(name, kind, tmp_path_factory):
    family = FAMILIES[name]
    _, processor = open_processor(name, tmp_path_factory)
    encoder, features = encoded(family, processor, kind)
    tokenizer = encoder.tokenizer
    end_of_turn = tokenizer.convert_tokens_to_ids(family.end_of_turn[0])
    replies = [m["content"] for m in row_to_examples(rows(family)[kind])[0].messages if m["role"] == "assistant"]
    runs = supervised_runs(features)
    assert len(runs) == len(replies)
    for run, reply in zip(runs, replies):
        assert run[-1] == end_of_turn, tokenizer.decode(run)  # the model learns to stop with the real token
        assert tokenizer.decode(run[:-1]).strip() == reply  # ... right after the reply, nothing else
    ids = features["input_ids"]
    if family.bos:
        bos = tokenizer.convert_tokens_to_ids(family.bos)
        assert ids[0] == bos and ids.count(bos) == 1
    assert "<\\s>" not in tokenizer.decode(ids)  # no literal stand-in for </s>
    text = encoder.conversation(list(row_to_examples(rows(family)[kind])[0].messages))[0]
    assert family.image_token + "\n\n" not in text  # LLaVA-style "<image>\nQ" keeps one newline, not two


@pytest.mark.parametrize("name", CHAT_FAMILIES)
def test_a_mixed_batch_trains_every_lora_parameter(name, tmp_path_factory):
    from finetune.adapters import attach_adapters

    family = FAMILIES[name]
    folder, processor = open_processor(name, tmp_path_factory)
    features = [encoded(family, processor, kind)[1] for kind in ("vqa", "text-only", "multi-turn")]
    batch = Collator(make_encoder(processor, 4096).pad_token_id)(features)
    for key in family.extra_inputs:
        assert key in batch, key  # image grids, token types ... reach the model
    model = AutoModelForImageTextToText.from_pretrained(folder)
    model.requires_grad_(False)
    model = attach_adapters(model, AdapterConfig(dropout=0.0))
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # lora_A gets a gradient only once lora_B (zero at the start) has moved
        loss = model(**batch).loss
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    unchanged = [n for n, p in model.named_parameters() if n in lora and torch.equal(p, lora[n])]
    assert lora and not unchanged


@pytest.mark.parametrize("name", CHAT_FAMILIES)
def test_generation_stops_at_the_family_end_of_turn_and_is_greedy(name, tmp_path_factory):
    family = FAMILIES[name]
    folder, processor = open_processor(name, tmp_path_factory)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    encoder = make_encoder(processor, 4096)
    tokenizer = encoder.tokenizer
    stops = set(stop_token_ids(model, encoder))
    assert {tokenizer.convert_tokens_to_ids(t) for t in family.end_of_turn} <= stops
    reply = tokenizer("Red.", add_special_tokens=False)["input_ids"]
    eot = tokenizer.convert_tokens_to_ids(family.end_of_turn[0])
    assert answer_text([*reply, eot, *reply, eot], stops, tokenizer) == "Red."
    prompts = [([{"role": "user", "content": "<image>\nWhat color is the cat?"}], [image(family)], folder),
               ([{"role": "user", "content": "Is the sky blue?"}], [], folder)]  # image and text-only, one batch
    # A checkpoint whose generation_config samples and penalises repeats must still be decoded greedily.
    model.generation_config.do_sample, model.generation_config.repetition_penalty = True, 50.0
    ours = generate(model, processor, prompts, max_new_tokens=6, batch_size=2, quiet=True)
    inputs = encoder.prompt_inputs([(m, imgs) for m, imgs, _ in prompts])
    plain = model.generate(**inputs, max_new_tokens=6, do_sample=False, repetition_penalty=1.0,
                           eos_token_id=sorted(stops), pad_token_id=encoder.pad_token_id)
    expected = [answer_text(r, stops, tokenizer) for r in plain[:, inputs["input_ids"].shape[1]:].tolist()]
    assert ours == expected
    assert greedy_config(model, encoder, 6).repetition_penalty == 1.0
    special = [t for t in tokenizer.all_special_tokens if t]
    assert not any(t in answer for answer in ours for t in special)
    # A model that always says "end of turn" answers nothing, after one token.
    def end_of_turn_only(module, inputs, logits):
        forced = torch.full_like(logits, -1e4)
        forced[..., eot] = 1e4
        return forced

    model.get_output_embeddings().register_forward_hook(end_of_turn_only)
    model.generation_config.do_sample = False
    assert generate(model, processor, prompts[:1], max_new_tokens=6, quiet=True) == [""]


def test_paligemma_is_trained_as_prefix_and_suffix(tmp_path_factory):
    family = FAMILIES["paligemma2"]
    _, processor = open_processor("paligemma2", tmp_path_factory)
    encoder, features = encoded(family, processor, "vqa")
    tokenizer = encoder.tokenizer
    (run,) = supervised_runs(features)
    assert tokenizer.decode(run) == REPLIES[0] + "<eos>"  # the suffix and its EOS, nothing of the prefix
    types = features["token_type_ids"]
    first = features["labels"].index(run[0])
    assert set(types[:first]) == {0} and set(types[first:]) == {1}  # prefix bidirectional, suffix causal
    assert features["input_ids"].count(tokenizer.bos_token_id) == 1
    with pytest.raises(FinetuneError, match="one question and one answer per row"):
        encoded(family, processor, "multi-turn")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["auto", pytest.param("bfloat16", marks=pytest.mark.bf16)])  # auto: bf16 on a GPU
@pytest.mark.parametrize("quantization", ["none", "4bit"])
@pytest.mark.parametrize("name", NAMES)
def test_train_evaluate_and_merge_each_family(name, quantization, dtype, tmp_path_factory, tmp_path):
    """The whole toolkit on the twin: train a few steps, evaluate (generation), merge = base + adapter."""
    from peft import PeftModel

    from finetune import evaluate, merge, train

    if quantization == "4bit":
        pytest.importorskip("bitsandbytes")
    family = FAMILIES[name]
    folder, processor = open_processor(name, tmp_path_factory)
    image(family).save(tmp_path / "a.png")
    data = tmp_path / "data.jsonl"
    kinds = ["vqa"] if family.chat_template is None else ["vqa", "multi-turn", "text-only", "system"]
    data.write_text("".join(json.dumps(rows(family)[kind]) + "\n" for kind in kinds) * 2)
    run = train({"model": {"name": str(folder), "quantization": quantization, "dtype": dtype}, "data": {"train": str(data)},
                 "output_dir": str(tmp_path / "run"), "adapter": {"dropout": 0.0},
                 "train": {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-2,
                           "save_strategy": "no", "logging_steps": 1}})
    losses = [e["loss"] for e in json.loads((run / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)  # logged every step
    metrics = evaluate(run, {"data.eval": str(data), "eval.max_new_tokens": 4}, quiet=True)
    assert metrics["examples"] == len(kinds) * 2
    merged = AutoModelForImageTextToText.from_pretrained(merge(run, tmp_path / "merged")).eval()
    # The merged folder keeps the dtype the base was loaded in (bf16 on a GPU): compare in that dtype.
    base = AutoModelForImageTextToText.from_pretrained(folder, dtype=merged.dtype)
    base = PeftModel.from_pretrained(base, str(run)).eval()
    encoder = make_encoder(processor, 4096)
    batch = Collator(encoder.pad_token_id)([encoder.encode(row_to_examples(rows(family)["vqa"])[0],
                                                           images=[image(family)])])
    batch.pop("labels")
    batch = {k: v.to(merged.dtype) if v.is_floating_point() else v for k, v in batch.items()}
    tolerance = 1e-4 if merged.dtype == torch.float32 else 5e-2  # bf16: the merge rounds W + BA once more
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits.float(), base(**batch).logits.float(), atol=tolerance,
                                   rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_logits_at_supervised_positions_only_give_the_models_own_loss(name, tmp_path_factory):
    from finetune.training import SupervisedLogitsLoss, keeps_logits

    family = FAMILIES[name]
    folder, processor = open_processor(name, tmp_path_factory)
    kinds = ("vqa",) if family.chat_template is None else ("vqa", "text-only", "multi-turn")
    batch = Collator(make_encoder(processor, 4096).pad_token_id)([encoded(family, processor, k)[1] for k in kinds])
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    assert keeps_logits(model)
    labels = batch.pop("labels")
    loss = SupervisedLogitsLoss()
    with torch.no_grad():
        ours = loss(model(**batch, logits_to_keep=loss.positions(labels)), labels)
        theirs = model(**batch, labels=labels).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["vqa", "multi-turn", "text-only", "system"])
@pytest.mark.parametrize("name", CHAT_FAMILIES)
def test_the_encoder_renders_what_apply_chat_template_renders(name, kind, tmp_path_factory):
    """The encoder renders the template directly (faster); the text must be the processor's own."""
    from finetune.data.encode import _content_parts

    family = FAMILIES[name]
    _, processor = open_processor(name, tmp_path_factory)
    encoder = make_encoder(processor, 4096)
    messages = list(row_to_examples(rows(family)[kind])[0].messages)
    for upto, prompt in ((len(messages), False), (len(messages) - 1, True)):
        parts = [{"role": m["role"], "content": _content_parts(m["content"])} for m in messages[:upto]]
        theirs = processor.apply_chat_template(parts, tokenize=False, add_generation_prompt=prompt)
        ours = encoder.render(messages[:upto], add_generation_prompt=prompt)
        expected = theirs.replace("<\\s>", encoder.eos)
        if encoder.bos and not expected.startswith(encoder.bos):
            expected = encoder.bos + expected  # the BOS the template leaves to the tokenizer
        assert ours == expected


@pytest.mark.parametrize("name", CHAT_FAMILIES)
def test_a_text_only_batch_runs_the_vision_tower_on_a_placeholder(name, tmp_path_factory):
    """What keeps processes in lockstep under FSDP / ZeRO (finetune.vision_placeholder): on a text-only batch the
    vision tower and projector run once, the loss stays the text's exactly, and a projector trained in full gets a
    gradient (of zeros) instead of none."""
    from finetune.adapters import attach_adapters
    from finetune.vision_placeholder import VisionPlaceholder

    family = FAMILIES[name]
    folder, processor = open_processor(name, tmp_path_factory)
    encoder = make_encoder(processor, 4096)
    batch = Collator(encoder.pad_token_id)([encoded(family, processor, "text-only")[1]])
    model = AutoModelForImageTextToText.from_pretrained(folder)
    model.requires_grad_(False)
    model = attach_adapters(model, AdapterConfig(lora=False, train_fully=["projector"]))
    placeholder = VisionPlaceholder(model, encoder)
    plain = model(**batch).loss
    vision_calls = []
    placeholder.arm(batch)
    original = placeholder.image_features
    placeholder.image_features = lambda **kw: vision_calls.append(sorted(kw)) or original(**kw)
    loss = model(**batch).loss
    assert len(vision_calls) == 1 and "pixel_values" in vision_calls[0]
    assert loss.item() == plain.item()
    loss.backward()
    projector = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert projector and all(p.grad is not None and not p.grad.any() for p in projector)
    placeholder.arm({"pixel_values": torch.zeros(1)})  # a batch with images: nothing extra runs
    model(**batch)
    assert len(vision_calls) == 1
