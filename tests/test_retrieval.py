"""The retrieval task end to end on tiny random CLIP and SigLIP folders and the embedded tiny-clip: loading, LoRA
targets, training, evaluation checked against a direct computation written here, predict --labels, merge, push."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dual_encoders import build_clip, build_siglip, build_siglip2
from PIL import Image
from transformers import AutoModel

from finetune.adapters import attach_adapters
from finetune.config import AdapterConfig, ModelConfig
from finetune.errors import ConfigError, DataError
from finetune.models import load_model

ROOT = Path(__file__).resolve().parents[1]
COLORS = {"red": (215, 35, 35), "green": (30, 155, 50), "blue": (35, 70, 215), "yellow": (235, 205, 25)}


@pytest.fixture(scope="module", params=["clip", "siglip", "siglip2"])
def folder(request, tmp_path_factory):
    build = {"clip": build_clip, "siglip": build_siglip, "siglip2": build_siglip2}[request.param]
    return build(tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Pairs (two captions for some images) and classification rows over coloured squares, every image and
    caption distinct (so no two scores tie: ties would make any ranking of them arbitrary)."""
    root = tmp_path_factory.mktemp("pairs")
    pairs, labelled = [], []
    for i, (name, rgb) in enumerate([*COLORS.items()] * 3):
        image = Image.new("RGB", (40, 30), "white")
        image.paste(rgb, (2 * i, i, 2 * i + 12, i + 12))
        image.save(root / f"{i}.png")
        where = ("left", "middle", "right")[i // 4]
        captions = [f"a {name} square on the {where}"] + ([f"one {name} shape {where}"] if i % 2 else [])
        pairs.append({"id": f"p{i}", "image": f"{i}.png", "captions": captions})
        labelled.append({"image": f"{i}.png", "label": name})
    for name, rows in (("pairs.jsonl", pairs), ("labels.jsonl", labelled)):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def recipe(folder, data, out, **extra):
    return {"task": "retrieval", "model": {"name": str(folder)}, "output_dir": str(out),
            "data": {"train": str(data / "pairs.jsonl"), "eval": str(data / "pairs.jsonl")},
            "adapter": {"dropout": 0.0}, "eval": {"batch_size": 5},
            "train": {"max_steps": 3, "per_device_train_batch_size": 6, "learning_rate": 1e-2, "save_strategy": "no",
                      "logging_steps": 1}, **extra}


def test_lora_targets_attention_of_both_towers_and_trains_heads_and_temperature(folder):
    model, _ = load_model(ModelConfig(name=str(folder)), dual_encoder=True)
    peft = attach_adapters(model, AdapterConfig())
    lora = {n.split(".lora_")[0] for n, _ in peft.named_parameters() if "lora_" in n}
    assert lora and all(n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "out_proj") for n in lora)
    assert any(".vision_model." in n for n in lora) and any(".text_model." in n for n in lora)
    trainable = {n for n, p in peft.named_parameters() if p.requires_grad and "lora_" not in n}
    assert any(n.endswith("logit_scale") for n in trainable)
    if hasattr(model, "visual_projection"):  # CLIP's heads; SigLIP has none but its bias
        assert any("visual_projection" in n for n in trainable) and any("text_projection" in n for n in trainable)
    else:
        assert any(n.endswith("logit_bias") for n in trainable)
    mlp = attach_adapters(load_model(ModelConfig(name=str(folder)), dual_encoder=True)[0], AdapterConfig(mlp=True))
    assert any(n.endswith(("fc1.lora_A.default.weight", "fc2.lora_A.default.weight")) for n, _ in
               mlp.named_parameters())
    frozen = attach_adapters(load_model(ModelConfig(name=str(folder)), dual_encoder=True)[0],
                             AdapterConfig(freeze=["vision"]))
    trained = [n for n, p in frozen.named_parameters() if p.requires_grad]
    assert trained and not any(".vision_model." in n or "visual_projection" in n for n in trained)


def test_the_towers_load_in_4bit_with_the_heads_kept(folder):
    bnb = pytest.importorskip("bitsandbytes")
    model, _ = load_model(ModelConfig(name=str(folder), quantization="4bit"), dual_encoder=True)
    quantized = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert any(n.startswith("vision_model.") for n in quantized) and any(n.startswith("text_model.") for n in quantized)
    assert not any("projection" in n for n in quantized)


def direct_recall(model, processor, rows, root, k):
    """Recall@k both ways computed here, independently of finetune.metrics: loops over images and texts."""
    images = [Image.open(root / r["image"]).convert("RGB") for r in rows]
    texts = [c for r in rows for c in r["captions"]]
    owner = [i for i, r in enumerate(rows) for _ in r["captions"]]
    length = processor.tokenizer.model_max_length
    with torch.no_grad():
        out = model(**processor(text=texts, images=images, padding="max_length", max_length=length, truncation=True,
                                return_tensors="pt"))
    sim = out.logits_per_image  # images x texts, the model's own scores (monotone in the cosine)
    hits_i2t = sum(any(owner[j] == i for j in sim[i].argsort(descending=True)[:k].tolist()) for i in range(len(rows)))
    hits_t2i = sum(owner[j] in sim[:, j].argsort(descending=True)[:k].tolist() for j in range(len(texts)))
    return hits_i2t / len(rows), hits_t2i / len(texts)


def test_train_then_evaluate_matches_a_direct_computation(folder, data, tmp_path):
    from finetune import evaluate, load_adapter, train

    run = train(recipe(folder, data, tmp_path / "run"))
    assert (run / "logit_scale.safetensors").is_file()
    metrics = evaluate(run, quiet=True)
    model, processor = load_adapter(run)
    rows = [json.loads(line) for line in (data / "pairs.jsonl").read_text().splitlines()]
    for k in (1, 5):
        i2t, t2i = direct_recall(model, processor, rows, data, k)
        assert metrics[f"text_retrieval_recall@{k}"] == pytest.approx(i2t)
        assert metrics[f"image_retrieval_recall@{k}"] == pytest.approx(t2i)
    keys = [f"{w}_retrieval_recall@{k}" for w in ("text", "image") for k in (1, 5, 10)]
    assert metrics["mean_recall"] == pytest.approx(sum(metrics[k] for k in keys) / 6)
    predictions = [json.loads(line) for line in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == len(rows) and all(len(p["top5"]) == 5 for p in predictions)
    assert all(p["score"] == float(p["top5"][0]["match"]) for p in predictions)
    labels = evaluate(run, {"data.eval": str(data / "labels.jsonl")}, quiet=True)
    assert {"zeroshot_top1", "zeroshot_top5"} <= set(labels) and labels["zeroshot_top5"] == 1.0  # 4 classes


def test_merge_gives_a_plain_model_with_the_trained_temperature(folder, data, tmp_path):
    from finetune import load_adapter, merge, train

    run = train(recipe(folder, data, tmp_path / "run"))
    merged_dir = merge(run, tmp_path / "merged")
    assert not (merged_dir / "adapter_config.json").exists()
    merged = AutoModel.from_pretrained(merged_dir).eval()
    adapted, processor = load_adapter(run)
    base = AutoModel.from_pretrained(folder)
    assert not torch.equal(merged.logit_scale, base.logit_scale)  # the temperature was trained and kept
    image = Image.new("RGB", (40, 30), COLORS["red"])
    inputs = processor(text=["a red square", "a blue square"], images=[image], padding="max_length",
                       max_length=processor.tokenizer.model_max_length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits_per_image, adapted(**inputs).logits_per_image,
                                   atol=1e-4, rtol=0)


def test_bad_rows_and_wrong_use_are_one_line(folder, data, tmp_path):
    from finetune import predict, train
    from finetune.data.check import check_data

    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"image": "0.png", "caption": "a red square"}) + "\n"
                      + json.dumps({"image": "gone.png", "caption": "x"}) + "\n"
                      + json.dumps({"image": "0.png"}) + "\n")
    lines = []
    assert not check_data({**recipe(folder, data, tmp_path / "x"), "data": {"train": str(broken),
                                                                             "image_root": str(data)}},
                          write=lines.append)
    assert any(line.startswith(f"{broken}:2: image not found") for line in lines)
    assert f"{broken}:3: cannot tell the row's format from its columns (image); the retrieval task takes an image " \
           "with caption(s) (pairs) or with a label (classification)" in lines
    with pytest.raises(DataError, match=f"{broken}:2: image not found"):
        train({**recipe(folder, data, tmp_path / "y"), "data": {"train": str(broken), "image_root": str(data)}})
    with pytest.raises(ConfigError, match="templates must each contain"):
        train({**recipe(folder, data, tmp_path / "z"), "data": {"train": str(broken), "templates": ["a photo"]}})
    run = train(recipe(folder, data, tmp_path / "run"))
    with pytest.raises(ConfigError, match="--labels"):
        predict(run, str(data / "0.png"), "What is it?")


@pytest.mark.slow
def test_the_demo_raises_recall_and_zero_shot_accuracy_and_the_cli_ranks_labels(tmp_path):
    """The embedded tiny-clip: demo/retrieval's held-out mean recall and zero-shot colour accuracy clearly rise."""
    from finetune import evaluate, train

    run = train("demo/retrieval", {"output_dir": str(tmp_path / "run")})
    before = json.loads((run / "eval-before" / "metrics.json").read_text())["mean_recall"]
    after = json.loads((run / "eval" / "metrics.json").read_text())["mean_recall"]
    assert after >= before + 0.2, (before, after)
    zero_shot = {"data.eval": "synthetic:classification/eval"}
    base = evaluate("demo/retrieval", {**zero_shot, "output_dir": str(tmp_path / "base")}, quiet=True)
    adapted = evaluate(run, zero_shot, quiet=True)
    assert adapted["zeroshot_top1"] >= base["zeroshot_top1"] + 0.15, (base, adapted)
    from finetune.demo.synthetic import make_scenes, render

    scene = make_scenes(1, seed=11)[0]
    render(scene).save(tmp_path / "shape.png")
    done = subprocess.run([sys.executable, "-m", "finetune", "predict", str(run), "--image", str(tmp_path / "shape.png"),
                           "--labels", "red,green,blue,yellow,purple,orange"], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    ranked = [line.split() for line in done.stdout.strip().splitlines()]
    assert sorted(label for label, _ in ranked) == sorted(["red", "green", "blue", "yellow", "purple", "orange"])
    assert sum(float(p) for _, p in ranked) == pytest.approx(1.0, abs=1e-3)  # CLIP: a softmax over the labels
    assert [float(p) for _, p in ranked] == sorted((float(p) for _, p in ranked), reverse=True)


def test_card_resume_and_push(folder, data, tmp_path):
    import re

    from huggingface_hub import ModelCard

    from finetune import train
    from finetune.card import write_model_card
    from finetune.hub import shared_files

    common = {**recipe(folder, data, tmp_path / "run"), "eval": {"before_after": True, "batch_size": 5}}
    common["train"] = {**common["train"], "max_steps": 4, "save_strategy": "steps", "save_steps": 2}
    run = train(common)
    card = ModelCard.load(write_model_card(run))
    assert card.data.pipeline_tag == "zero-shot-image-classification" and "retrieval" in card.data.tags
    assert {r.metric_name for r in card.data.eval_results} >= {"mean_recall", "text_retrieval_recall@1"}
    assert "logit_scale.safetensors" in shared_files(run)  # push uploads the trained temperature
    code = re.search(r"```python\n(.*?)```", card.text, re.DOTALL).group(1)
    code = re.sub(r'^base_id = .*$', f'base_id = "{folder}"', code, count=1, flags=re.MULTILINE)
    namespace = {}
    exec(compile(code, "model-card-snippet", "exec"), namespace)  # noqa: S102 - our own card
    assert len(namespace["probabilities"]) == 3  # the snippet ranks its labels
    resumed = train({**common, "train": {**common["train"], "max_steps": 6, "resume_from_checkpoint": True}})
    state = json.loads((resumed / "trainer_state.json").read_text())
    assert state["global_step"] == 6 and [e["step"] for e in state["log_history"] if "loss" in e] == list(range(1, 7))
