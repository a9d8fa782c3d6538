"""eval / predict / chat on the embedded default, and the proof that fine-tuning helps."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune import train
from finetune.evaluation import evaluate
from finetune.generation import answer_text, generate, stop_token_ids
from finetune.metrics import vqa_accuracy
from finetune.run import load_adapter

ROOT = Path(__file__).resolve().parents[1]
EVAL = {"data.eval": "synthetic:vqa/eval?n=8", "eval.max_examples": 16}


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "vqa"
    return train("demo/vqa", {"output_dir": str(out), "data.train": "synthetic:vqa/train?n=16", "data.eval": None,
                              "train.max_steps": 4, "train.save_strategy": "no"})


def test_eval_of_a_run_writes_metrics_and_predictions(small_run, capsys):
    metrics = evaluate(small_run, EVAL)
    assert 0 <= metrics["vqa_accuracy"] <= 1 and metrics["examples"] == 16 and metrics["examples_per_second"] > 0
    assert {"vqa_accuracy/color", "vqa_accuracy/count"} <= set(metrics)  # per question type
    saved = json.loads((small_run / "eval" / "metrics.json").read_text())
    assert saved == metrics
    rows = [json.loads(line) for line in (small_run / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 16
    assert set(rows[0]) == {"id", "prompt", "prediction", "references", "score", "images", "messages", "ended"}
    assert metrics["answers_ended"] == pytest.approx(sum(r["ended"] for r in rows) / 16, abs=1e-4)
    # Per-example scores are the official per-question accuracies; their mean is the metric.
    assert [r["score"] for r in rows] == [vqa_accuracy(r["prediction"], r["references"]) for r in rows]
    assert metrics["vqa_accuracy"] == pytest.approx(sum(r["score"] for r in rows) / 16)
    assert all(Path(image).is_absolute() and Path(image).is_file() for r in rows for image in r["images"])
    assert rows[0]["images"] and rows[0]["messages"][-1] == {"role": "user", "content": rows[0]["prompt"]}
    assert (small_run / "report.html").is_file()  # finetune eval refreshes the run's report
    assert "vqa_accuracy" in capsys.readouterr().out  # the printed table


def test_eval_of_a_recipe_scores_the_base_model(tmp_path):
    metrics = evaluate("demo/vqa", {**EVAL, "output_dir": str(tmp_path)})
    assert (tmp_path / "eval-base" / "metrics.json").is_file() and metrics["examples"] == 16


def test_batched_left_padded_generation_matches_one_by_one(small_run):
    from finetune.config import load_recipe
    from finetune.evaluation import eval_items

    model, processor = load_adapter(small_run)
    recipe = load_recipe(small_run / "recipe.yaml", {"data.eval": "synthetic:dialogue/eval?n=4"})
    items = eval_items(recipe)  # prompts of different lengths, so the batch really is padded
    prompts = [(i.prompt, list(i.example.images), i.example.root) for i in items]
    assert len({len(str(p[0])) for p in prompts}) > 1
    batched = generate(model, processor, prompts, max_new_tokens=12, batch_size=4, quiet=True)
    single = [generate(model, processor, [p], max_new_tokens=12, batch_size=1, quiet=True)[0] for p in prompts]
    assert batched == single


def test_answers_are_cut_at_the_end_of_turn(random_tiny, processor):
    from transformers import AutoModelForImageTextToText

    from finetune.data.encode import make_encoder

    tokenizer = processor.tokenizer
    stops = set(stop_token_ids(AutoModelForImageTextToText.from_pretrained(random_tiny), make_encoder(processor, 64)))
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stops
    ids = tokenizer("red<|im_end|>\n<|im_start|>user\nmore", add_special_tokens=False)["input_ids"]
    assert answer_text(ids, stops, tokenizer) == "red"
    assert answer_text(tokenizer("  two circles ", add_special_tokens=False)["input_ids"], stops, tokenizer) == \
        "two circles"


def test_dialogue_eval_reports_rouge_and_perplexity(small_run, tmp_path):
    metrics = evaluate(small_run, {"task": "dialogue", "data.eval": "synthetic:dialogue/eval?n=4"},
                       output_dir=tmp_path)
    assert 0 <= metrics["ROUGE-L"] <= 1 and metrics["perplexity"] > 1


def test_caption_eval_reports_coco_metrics(small_run, tmp_path):
    metrics = evaluate(small_run, {"task": "caption", "data.eval": "synthetic:caption/eval?n=4"},
                       output_dir=tmp_path)
    assert {"BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr"} <= set(metrics) and metrics["examples"] == 4


def cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "finetune", *args], input=stdin, capture_output=True, text=True,
                          check=False, cwd=ROOT, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.slow
def test_predict_and_chat_commands(small_run, tmp_path, shapes_image):
    image = tmp_path / "shapes.png"
    shapes_image.save(image)
    done = cli("predict", str(small_run), "--image", str(image), "--prompt", "What color are the shapes?")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip()  # one answer line
    talk = cli("chat", str(small_run), "--image", str(image), stdin="What color are the shapes?\nAnd the shape?\n/quit\n")
    assert talk.returncode == 0, talk.stderr[-2000:]
    assert talk.stdout.count("model> ") == 2
    missing = cli("predict", str(small_run), "--image", str(tmp_path / "nope.png"), "--prompt", "Hi")
    assert missing.returncode == 2 and "image not found" in missing.stderr


def test_chat_keeps_the_conversation(small_run, tmp_path, shapes_image):
    from finetune.chat import chat

    image = tmp_path / "shapes.png"
    shapes_image.save(image)
    inputs = iter(["What color are the shapes?", "And how many?", "/quit"])
    messages = chat(small_run, str(image), read=lambda _: next(inputs), write=lambda _: None)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[0]["content"].startswith("<image>") and "<image>" not in messages[2]["content"]


@pytest.mark.slow
def test_fine_tuning_clearly_improves_held_out_vqa(tmp_path, capsys):
    """The demo's proof of learning on a smaller budget: 100 training scenes, 2 epochs."""
    train("demo/vqa", {"output_dir": str(tmp_path / "run"), "data.train": "synthetic:vqa/train?n=100",
                       "train.num_train_epochs": 2, "eval.max_examples": 100})
    before = json.loads((tmp_path / "run" / "eval-before" / "metrics.json").read_text())["vqa_accuracy"]
    after = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())["vqa_accuracy"]
    assert before <= 0.1 and after >= 0.5, (before, after)
    assert f"before {before:.4f} -> after {after:.4f}" in capsys.readouterr().out


@pytest.mark.slow
def test_the_demo_learns_to_stop_on_ninety_one_word_answers(tmp_path):
    """90 colour questions answered in one word: the adapter must end (nearly) every answer with <|im_end|>,
    not run on into the base captioner's habit ("green green squares at the top ...")."""
    from finetune.demo.synthetic import write_dataset

    files = {}
    for split, scenes in (("train", 90), ("eval", 50)):
        rows = [json.loads(line) for line in write_dataset("vqa", split, tmp_path / split, n=scenes).open()]
        files[split] = tmp_path / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps({**r, "image": f"{split}/{r['image']}"}) + "\n"
                                        for r in rows if r["question_type"] == "color"))
    train("demo/vqa", {"output_dir": str(tmp_path / "run"), "data.train": str(files["train"]),
                       "data.eval": str(files["eval"])})
    after = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert after["examples"] == 50 and after["answers_ended"] >= 0.95, after


def test_a_run_folder_named_like_a_shipped_recipe_is_the_run(small_run, tmp_path, monkeypatch):
    import shutil

    from finetune.evaluation import open_target

    shutil.copytree(small_run, tmp_path / "vqa")
    monkeypatch.chdir(tmp_path)
    _, _, recipe, run = open_target("vqa")  # the run folder ./vqa, not recipes/vqa.yaml (LLaVA-1.5-7B)
    assert run is not None and recipe.model.name == "tiny-llava"
