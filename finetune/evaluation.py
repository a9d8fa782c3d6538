"""Batched generation on held-out data, scored with the task's official metric.

`evaluate(run_folder)` scores base + adapter; `evaluate(recipe)` scores the base model alone (the
"before" number). Writes metrics.json and predictions.jsonl, prints a table.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from finetune.config import Recipe, load_recipe
from finetune.data.collate import ChatEncoder
from finetune.data.dataset import image_root, load_examples
from finetune.data.images import open_image
from finetune.errors import ConfigError, DataError
from finetune.models import choose_dtype, load_model
from finetune.tasks import TASKS

log = logging.getLogger(__name__)


def is_run_folder(target) -> bool:
    return isinstance(target, (str, Path)) and (Path(target) / "adapter_config.json").is_file()


def load_for_inference(target, overrides=None):
    """(model, processor, recipe) for a run folder (base + adapter) or a recipe (base alone)."""
    from peft import PeftModel
    from transformers import AutoProcessor

    if is_run_folder(target):
        recipe = load_recipe(Path(target) / "recipe.yaml", overrides)
        model, _ = load_model(recipe.model)
        model = PeftModel.from_pretrained(model, str(target))
        processor = AutoProcessor.from_pretrained(str(target))
    else:
        if isinstance(target, (str, Path)) and Path(target).is_dir():
            raise ConfigError(f"{target} is a folder without adapter_config.json: not a finished run")
        recipe = load_recipe(target, overrides)
        model, processor = load_model(recipe.model)
    model.eval()
    return model, processor, recipe


def evaluate(target, overrides: list[str] | dict | None = None, model=None, processor=None,
             output_dir: str | Path | None = None, quiet: bool = False, write: bool = True) -> dict:
    """Task metrics on `data.eval`; writes metrics.json and predictions.jsonl; returns the metrics."""
    if model is None:
        model, processor, recipe = load_for_inference(target, overrides)
    else:
        recipe = target if isinstance(target, Recipe) else load_recipe(target, overrides)
    if not recipe.data.eval:
        raise ConfigError("no evaluation data: set data.eval=FILE")
    task = TASKS[recipe.task]
    items = eval_items(recipe)
    start = time.perf_counter()
    predictions = generate(model, processor, [(i["messages"], i["images"], i["root"]) for i in items],
                           max_new_tokens=recipe.eval.max_new_tokens or task.max_new_tokens,
                           batch_size=recipe.eval.batch_size, dtype=choose_dtype(recipe.model), quiet=quiet)
    seconds = time.perf_counter() - start
    metrics = task.score(predictions, [i["references"] for i in items], [i["type"] for i in items])
    if recipe.task == "dialogue":
        metrics["perplexity"] = perplexity(model, processor, recipe, items)
    metrics.update({"examples": len(items), "examples_per_second": round(len(items) / max(seconds, 1e-9), 3),
                    "dataset": recipe.data.eval})
    out = Path(output_dir or recipe.eval.output_dir or (
        Path(target) / "eval" if is_run_folder(target) else Path(recipe.output_dir) / "eval-base"))
    if write:
        scores = task.per_example(predictions, [i["references"] for i in items]) if task.per_example else None
        write_results(out, metrics, items, predictions, scores)
    if write and is_run_folder(target):
        from finetune.hub import write_model_card
        from finetune.report import refresh_report

        write_model_card(Path(target), metrics=metrics)  # the card's evaluation table follows the newest eval
        refresh_report(Path(target), recipe.eval.report_examples)
    if not quiet:
        print(format_table(metrics, title=f"{recipe.task} on {recipe.data.eval}"))
    return metrics


def eval_items(recipe: Recipe) -> list[dict]:
    """One item per held-out row: the conversation up to the last reply, and what to compare with."""
    rows, examples, report = load_examples(recipe.data.eval, recipe.data, recipe.data.eval_split or "validation")
    if report.problems and recipe.data.on_error == "fail":
        raise DataError(report.summary() + "\n(set data.on_error=skip to drop these rows)")
    root = image_root(recipe.data, rows)
    items, seen = [], set()
    for example in examples:
        if example["location"] in seen:  # caption rows give one example per caption; score each row once
            continue
        seen.add(example["location"])
        messages = example["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        references = example["meta"].get("references") or [messages[last]["content"]]
        items.append({"id": example["meta"].get("id") or example["location"], "messages": messages[:last],
                      "images": example["images"], "root": root, "references": references,
                      "type": example["meta"].get("question_type"), "full": messages[: last + 1]})
    if recipe.eval.max_examples:
        items = items[: recipe.eval.max_examples]
    return items


@torch.no_grad()
def generate(model, processor, prompts: list[tuple], max_new_tokens: int, batch_size: int = 16,
             dtype: torch.dtype | None = None, quiet: bool = False) -> list[str]:
    """Greedy, batched, left-padded generation; each answer cut at the end-of-turn token."""
    encoder = ChatEncoder(processor, max_length=10**9)
    tokenizer = encoder.tokenizer
    tokenizer.padding_side = "left"  # decoder-only: new tokens must follow every prompt directly
    device = next(model.parameters()).device
    answers = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="generating", disable=quiet, unit="batch"):
        batch = prompts[start : start + batch_size]
        texts = [encoder.render(messages, add_generation_prompt=True) for messages, _, _ in batch]
        images = [open_image(v, root) for _, values, root in batch for v in values]
        if images:
            inputs = processor(text=texts, images=images, padding=True, add_special_tokens=False, return_tensors="pt")
        else:
            inputs = tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt")
        inputs = {k: (v.to(device, dtype) if v.is_floating_point() and dtype else v.to(device)) for k, v in
                  inputs.items()}
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        answers += [_cut(tokenizer.decode(t, skip_special_tokens=False), tokenizer) for t in new_tokens]
    return answers


def _cut(text: str, tokenizer) -> str:
    """The reply up to the first end-of-turn token, without special tokens."""
    stops = {tokenizer.eos_token, tokenizer.pad_token, *getattr(tokenizer, "additional_special_tokens", [])}
    stops.discard(None)
    stops.discard("<image>")
    cut = len(text)
    for stop in stops:
        position = text.find(stop)
        if position != -1:
            cut = min(cut, position)
    return text[:cut].strip()


@torch.no_grad()
def perplexity(model, processor, recipe: Recipe, items: list[dict]) -> float:
    """exp(mean loss) over held-out assistant tokens only (the same labels training uses)."""
    encoder = ChatEncoder(processor, max_length=recipe.data.max_length, dtype=choose_dtype(recipe.model))
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for item in items:
        features = encoder.encode({"messages": item["full"], "images": item["images"], "root": item["root"]})
        batch = {k: (torch.tensor([v]) if isinstance(v, list) else v).to(device) for k, v in features.items()}
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        total += float(model(**batch).loss) * tokens
        count += tokens
    return round(float(torch.exp(torch.tensor(total / max(count, 1)))), 4)


def write_results(out: Path, metrics: dict, items: list[dict], predictions: list[str],
                  scores: list[float] | None = None) -> None:
    """metrics.json, and predictions.jsonl with what the report's gallery shows (images, turns, score)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    with (out / "predictions.jsonl").open("w") as handle:
        for n, (item, prediction) in enumerate(zip(items, predictions)):
            prompt = item["messages"][-1]["content"] if item["messages"] else ""
            row = {"id": item["id"], "prompt": prompt, "prediction": prediction, "references": item["references"],
                   "images": [p for p in (_image_path(v, item["root"]) for v in item["images"]) if p],
                   "messages": [{"role": m["role"], "content": m["content"]} for m in item["messages"]]}
            if scores is not None:
                row["score"] = round(float(scores[n]), 6)
            handle.write(json.dumps(row) + "\n")


def _image_path(value, root: Path) -> str | None:
    """An image value's absolute path; None for images embedded as bytes (a Hub dataset's)."""
    value = value.get("path") if isinstance(value, dict) and not value.get("bytes") else value
    if not isinstance(value, (str, Path)) or not str(value) or str(value).startswith(("http://", "https://")):
        return None
    path = Path(value).expanduser()
    return str((path if path.is_absolute() else Path(root) / path).resolve())


def format_table(metrics: dict, title: str) -> str:
    width = max(len(k) for k in metrics)
    lines = [title, "-" * (width + 12)]
    for key, value in metrics.items():
        lines.append(f"{key:<{width}}  {value:>10.4f}" if isinstance(value, float) else f"{key:<{width}}  {value:>10}")
    return "\n".join(lines)


def predict(run, image: str | None, prompt: str, max_new_tokens: int | None = None) -> str:
    """One answer from a run folder (or a recipe) for one image and prompt."""
    model, processor, recipe = load_for_inference(run)
    content = ("<image>\n" if image else "") + prompt
    images = [str(Path(image).resolve())] if image else []
    return generate(model, processor, [([{"role": "user", "content": content}], images, Path.cwd())],
                    max_new_tokens or TASKS[recipe.task].max_new_tokens, dtype=choose_dtype(recipe.model),
                    quiet=True)[0]
