"""Held-out evaluation: `score()` (pure: model + items -> metrics and per-example predictions) and the
`evaluate` / `predict` commands, which open a run or a recipe, write the files, refresh the card and print.

`evaluate(run_folder_or_hub_id)` scores base + adapter; `evaluate(recipe)` scores the base model alone.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from finetune.config import Recipe, find_recipe, load_recipe
from finetune.data.dataset import load_examples
from finetune.data.encode import make_encoder
from finetune.data.formats import Example
from finetune.errors import ConfigError, DataError
from finetune.generation import generate
from finetune.parallelism import gather_in_order, is_first_process, my_share
from finetune.precision import compute_dtype, inference_autocast
from finetune.tasks import TASKS, Task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalItem:
    """One held-out row: the conversation through its last reply, and what the prediction is compared with."""

    id: str
    example: Example  # ends with the held-out reply (perplexity scores it; generation gets what precedes it)
    references: tuple[str, ...]
    question_type: str | None

    @property
    def prompt(self) -> list[dict]:
        return list(self.example.messages[:-1])


def eval_items(recipe: Recipe) -> list:
    """One item per held-out row (a caption row with several captions is scored once, against all of them);
    for a contrastive task, the image-text pairs (finetune.retrieval)."""
    if not recipe.data.eval:
        raise ConfigError("no evaluation data: set data.eval=FILE")
    if TASKS[recipe.task].kind == "contrastive":
        from finetune.retrieval import eval_pairs

        return eval_pairs(recipe)
    examples, report = load_examples(recipe.data.eval, recipe.data, recipe.data.eval_split or "validation")
    if report.problems and recipe.data.on_error == "fail":
        raise DataError(report.summary() + "\n(set data.on_error=skip to drop these rows)")
    items, seen = [], set()
    for example in examples:
        if example.location in seen:
            continue
        seen.add(example.location)
        last = max(i for i, m in enumerate(example.messages) if m["role"] == "assistant")
        example = replace(example, messages=example.messages[: last + 1])
        items.append(EvalItem(id=example.id or example.location, example=example,
                              references=example.references or (example.messages[last]["content"],),
                              question_type=example.question_type))
    return items[: recipe.eval.max_examples] if recipe.eval.max_examples else items


def score(model, processor, items: list, task: Task, max_new_tokens: int | None = None,
          batch_size: int = 16, max_length: int = 2048, quiet: bool = True,
          templates: list[str] | None = None) -> tuple[dict, list[dict]]:
    """Generate an answer for every item and score it with the task's metric (a contrastive task: rank texts
    by embedding instead, finetune.retrieval).

    Returns (metrics, predictions): one prediction row per item with its per-example score."""
    if task.kind == "contrastive":
        from finetune.retrieval import score_pairs

        return score_pairs(model, processor, items, templates or ["{label}"], batch_size)
    start = time.perf_counter()
    # Each process generates its share; every process gets all answers, in order, and scores them alike.
    prompts = [(i.prompt, list(i.example.images), i.example.root) for i in my_share(items)]
    generated = gather_in_order(generate(model, processor, prompts, max_new_tokens=max_new_tokens or task.max_new_tokens,
                                         batch_size=batch_size, quiet=quiet, with_ends=True))
    seconds = time.perf_counter() - start
    answers = [text for text, _ in generated]
    metrics, per_example = task.score(answers, [list(i.references) for i in items], [i.question_type for i in items])
    if task.name == "dialogue":
        metrics["perplexity"] = perplexity(model, processor, items, max_length)
    # Answers that ended with the end-of-turn token rather than running out of max_new_tokens: a model that has
    # not learned to stop shows here before its metric suffers.
    metrics["answers_ended"] = round(sum(ended for _, ended in generated) / len(items), 4)
    metrics["examples"] = len(items)
    metrics["examples_per_second"] = round(len(items) / max(seconds, 1e-9), 3)
    predictions = [{**_prediction_row(item, answer, value), "ended": ended}
                   for item, (answer, ended), value in zip(items, generated, per_example)]
    return metrics, predictions


@torch.no_grad()
def perplexity(model, processor, items: list[EvalItem], max_length: int) -> float:
    """exp(mean loss) over held-out assistant tokens only (the same labels training uses)."""
    encoder = make_encoder(processor, max_length, dtype=compute_dtype(model))
    total, count = 0.0, 0
    with inference_autocast(model):
        for item in my_share(items):
            features = encoder.encode(item.example)
            batch = {k: (torch.tensor([v]) if isinstance(v, list) else v).to(model.device) for k, v in features.items()}
            tokens = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch).loss) * tokens
            count += tokens
    shares = gather_in_order([(total, count)])
    total, count = sum(t for t, _ in shares), sum(c for _, c in shares)
    return round(float(torch.exp(torch.tensor(total / max(count, 1)))), 4)


def _prediction_row(item: EvalItem, prediction: str, value: float) -> dict:
    messages = item.prompt
    root = item.example.root or Path.cwd()
    images = [str((root / v).resolve()) if isinstance(v, (str, Path)) else None for v in item.example.images]
    return {"id": item.id, "prompt": messages[-1]["content"] if messages else "", "prediction": prediction,
            "references": list(item.references), "score": round(float(value), 6),
            "images": [i for i in images if i], "messages": messages}


def write_results(out: Path, metrics: dict, predictions: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    with (out / "predictions.jsonl").open("w") as handle:
        for row in predictions:
            handle.write(json.dumps(row) + "\n")


def format_table(metrics: dict, title: str) -> str:
    width = max(len(k) for k in metrics)
    lines = [title, "-" * (width + 12)]
    for key, value in metrics.items():
        lines.append(f"{key:<{width}}  {value:>10.4f}" if isinstance(value, float) else f"{key:<{width}}  {value:>10}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ commands

def open_target(target, overrides=None):
    """(model, processor, recipe, run) for a run folder or Hub repo id (base + adapter; run is its Run) or a
    recipe (the base model alone; run is None). Models load on this process's GPU when there is one."""
    from finetune.models import inference_device, load_model
    from finetune.run import HUB_ID, Run, is_run_folder

    # A run folder wins over a shipped recipe of the same name (a run saved as ./vqa); then recipes; then Hub ids.
    if isinstance(target, (str, Path)) and (is_run_folder(target) or not _is_recipe(target)):
        if not is_run_folder(target):
            if Path(target).expanduser().is_dir():
                raise ConfigError(f"{target} is a folder without adapter_config.json: not a finished run")
            if not HUB_ID.match(str(target)):
                find_recipe(target)  # raises the "recipe not found" message with suggestions
        run = Run.open(target, overrides=overrides)
        model, processor = run.load()
        return model, processor, run.recipe, run
    recipe = load_recipe(target, overrides)
    model, processor = load_model(recipe.model, device=inference_device(),
                                  dual_encoder=TASKS[recipe.task].kind == "contrastive")
    return model.eval(), processor, recipe, None


def evaluate(target, overrides: list[str] | dict | None = None, output_dir: str | Path | None = None,
             quiet: bool = False) -> dict:
    """Task metrics on `data.eval`; writes metrics.json and predictions.jsonl (and refreshes a local run's
    model card); prints a table; returns the metrics."""
    model, processor, recipe, run = open_target(target, overrides)
    items = eval_items(recipe)
    metrics, predictions = score(model, processor, items, TASKS[recipe.task], recipe.eval.max_new_tokens,
                                 recipe.eval.batch_size, recipe.data.max_length, quiet=quiet,
                                 templates=recipe.data.templates)
    metrics["dataset"] = recipe.data.eval
    if not is_first_process():  # under torchrun every process scored its share; one writes and prints
        return metrics
    if output_dir:
        out = Path(output_dir)
    elif run is not None:
        out = run.eval_dir
    else:
        out = Path(recipe.eval.output_dir or Path(recipe.output_dir) / "eval-base")
    write_results(out, metrics, predictions)
    if run is not None and not run.remote:
        from finetune.card import write_model_card
        from finetune.report import refresh_report

        write_model_card(run.folder, metrics=metrics)  # the card's evaluation table follows the newest eval
        refresh_report(run.folder, recipe.eval.report_examples)
    if not quiet:
        print(format_table(metrics, title=f"{recipe.task} on {recipe.data.eval}"))
    return metrics


def predict(run, image: str | None, prompt: str | None = None, max_new_tokens: int | None = None,
            labels: list[str] | None = None):
    """One answer from a run folder, a Hub repo id or a recipe (the base model) for one image and prompt; for a
    retrieval run, the `labels` ranked for the image as [(label, probability), ...], best first."""
    model, processor, recipe, _ = open_target(run)
    if TASKS[recipe.task].kind == "contrastive":
        from finetune.data.images import open_image
        from finetune.retrieval import rank_labels

        if not image or labels is None:
            raise ConfigError("a retrieval run ranks labels for an image: give --image PATH --labels 'cat,dog,...'")
        return rank_labels(model, processor, open_image(image, Path.cwd()), labels, recipe.data.templates)
    if labels is not None or not prompt:
        raise ConfigError(f"a {recipe.task} run answers a question: give --prompt TEXT (--labels is for retrieval runs)")
    content = ("<image>\n" if image else "") + prompt
    images = [str(Path(image).resolve())] if image else []
    return generate(model, processor, [([{"role": "user", "content": content}], images, Path.cwd())],
                    max_new_tokens or TASKS[recipe.task].max_new_tokens, quiet=True)[0]


def _is_recipe(target) -> bool:
    if isinstance(target, (dict, Recipe)):
        return True
    try:
        find_recipe(target)
    except ConfigError:
        return False
    return True
