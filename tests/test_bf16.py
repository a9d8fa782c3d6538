"""Mixed precision as a GPU run has it, on the CPU: every shipped demo in bf16 (a 16-bit frozen base, fp32 trained
parts, autocast), with the before/after comparison and evaluation during training, then predict, chat, merge and
load_adapter on a bf16 run. Before the autocast in evaluation, every run that trains a module in full (retrieval's
projection heads, LLaVA's stage 1 projector) died here with "expected m1 and m2 to have the same dtype"."""

import json
import re

import pytest
import torch

from finetune import load_adapter, merge, train
from finetune.chat import chat
from finetune.evaluation import predict
from finetune.tasks import TASKS

pytestmark = [pytest.mark.slow, pytest.mark.bf16]
BF16 = {"model.dtype": "bfloat16", "train.max_steps": 2, "train.logging_steps": 1, "train.save_strategy": "no",
        "train.eval_strategy": "steps", "train.eval_steps": 2, "eval.before_after": True}
SMALL_DATA = {"data.train": "synthetic:vqa/train?n=16", "data.eval": "synthetic:vqa/eval?n=4"}
DEMOS = {
    "vqa": ("demo/vqa", SMALL_DATA),
    "captioning": ("demo/captioning", {"data.train": "synthetic:caption/train?n=16",
                                       "data.eval": "synthetic:caption/eval?n=4"}),
    "dialogue": ("demo/dialogue", {"data.train": "synthetic:dialogue/train?n=16",
                                   "data.eval": "synthetic:dialogue/eval?n=4"}),
    "retrieval": ("demo/retrieval", {"data.train": "synthetic:caption/train?n=16",
                                     "data.eval": "synthetic:caption/eval?n=8"}),
    "classification": ("demo/retrieval", {"data.train": "synthetic:caption/train?n=16",
                                          "data.eval": "synthetic:classification/eval?n=8"}),
    "stage 1": ("demo/vqa", {**SMALL_DATA, "adapter.lora": False, "adapter.train_fully": ["projector"]}),
}
BEFORE_AFTER = re.compile(r"held-out (\S+): before (\d\.\d{4}) -> after (\d\.\d{4})")


def bf16_run(recipe, overrides, out, capsys):
    run = train(recipe, {**BF16, **overrides, "output_dir": str(out)})
    printed = BEFORE_AFTER.search(capsys.readouterr().out)
    assert printed, "no before/after line"
    state = json.loads((run / "trainer_state.json").read_text())
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert any(k.startswith("eval_") for e in state["log_history"] for k in e)  # evaluated during training
    return run, printed


@pytest.mark.parametrize("demo", list(DEMOS))
def test_every_demo_trains_and_evaluates_in_bf16(demo, tmp_path, capsys):
    recipe, overrides = DEMOS[demo]
    run, printed = bf16_run(recipe, overrides, tmp_path / "run", capsys)
    from finetune.config import load_recipe

    task = TASKS[load_recipe(run / "recipe.yaml").task]
    headline = task.headline_in(json.loads((run / "eval" / "metrics.json").read_text()))
    assert printed[1] == headline


@pytest.fixture(scope="module")
def stage_two(tmp_path_factory):
    """LLaVA's two stages in bf16: the projector in full, then LoRA on the base with stage 1 folded in."""
    folder = tmp_path_factory.mktemp("bf16-stages")
    first = train("demo/vqa", {**BF16, **SMALL_DATA, "adapter.lora": False, "adapter.train_fully": ["projector"],
                               "output_dir": str(folder / "stage1"), "eval.before_after": False})
    second = train("demo/vqa", {**BF16, **SMALL_DATA, "model.adapter": str(first),
                                "output_dir": str(folder / "stage2")})
    return second


def test_stage_two_predicts_chats_merges_and_loads_in_bf16(stage_two, tmp_path, shapes_image):
    image = tmp_path / "shapes.png"
    shapes_image.save(image)
    question = "What colour is the largest shape?"
    answer = predict(stage_two, str(image), question, max_new_tokens=6)
    assert isinstance(answer, str)
    said = []
    typed = iter([question, "/quit"])
    conversation = chat(stage_two, str(image), max_new_tokens=6, read=lambda prompt: next(typed), write=said.append)
    assert conversation[-1]["role"] == "assistant" and conversation[-1]["content"] == answer
    model, processor = load_adapter(stage_two)  # the notebook's way: the same model and answer
    assert torch.bfloat16 in {p.dtype for p in model.parameters()}
    from finetune.generation import generate

    prompt = [{"role": "user", "content": "<image>\n" + question}]
    assert generate(model, processor, [(prompt, [str(image)], tmp_path)], 6, quiet=True) == [answer]
    merged = merge(stage_two, tmp_path / "merged")
    from transformers import AutoModelForImageTextToText

    assert AutoModelForImageTextToText.from_pretrained(merged).dtype == torch.bfloat16


def test_retrieval_predict_ranks_labels_in_bf16(tmp_path, shapes_image, capsys):
    run, _ = bf16_run(*DEMOS["retrieval"], tmp_path / "run", capsys)
    image = tmp_path / "shapes.png"
    shapes_image.save(image)
    ranked = predict(run, str(image), labels=["red shapes", "blue shapes", "green shapes"])
    assert sorted(label for label, _ in ranked) == ["blue shapes", "green shapes", "red shapes"]
    assert sum(p for _, p in ranked) == pytest.approx(1.0, abs=1e-3)  # CLIP-style: a softmax over the labels
