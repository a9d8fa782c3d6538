"""The run's model card (README.md): Hub front matter + a body rendered from templates/model_card.md.

Needs only huggingface_hub and the run folder's files (no torch), so `finetune push` starts fast.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from finetune.demo import is_embedded_model
from finetune.errors import FinetuneError
from finetune.run import HUB_ID, SCALARS, hub_base_id, is_run_folder, read_raw_recipe
from finetune.tasks import TASKS

TEMPLATE = Path(__file__).parent / "templates" / "model_card.md"
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt", ".tsv")


def write_model_card(run: Path, metrics: dict | None = None, repo: str | None = None) -> Path:
    """Write `run/README.md`: Hub front matter (base_model, tags, datasets, license, model-index) and a body
    with what was trained, the training settings, the evaluation table and a runnable usage snippet.
    `metrics` defaults to run/eval/metrics.json; `repo` (OWNER/NAME) is what the snippet loads."""
    from huggingface_hub import ModelCard, ModelCardData

    run = Path(run)
    if not is_run_folder(run):
        raise FinetuneError(f"{run} is not a run folder (no adapter_config.json): give a finished run's output_dir")
    recipe = read_raw_recipe(run)
    adapter = json.loads((run / "adapter_config.json").read_text())
    model = recipe.get("model", {})
    model_name = model.get("name") or adapter.get("base_model_name_or_path") or ""
    if metrics is None and (run / "eval" / "metrics.json").is_file():
        metrics = json.loads((run / "eval" / "metrics.json").read_text())
    task = TASKS.get(recipe.get("task"))
    quantized = model.get("quantization") == "4bit"
    base = hub_base_id(model_name)
    data = recipe.get("data", {})
    card_data = ModelCardData(
        model_name=repo.split("/")[-1] if repo else run.resolve().name,
        base_model=base,  # the Hub rejects local paths here, so a local base without a Hub id is left out
        library_name="peft",
        pipeline_tag=task.pipeline_tag if task else "image-text-to-text",
        tags=[t for t in (recipe.get("task"), "qlora" if quantized else "lora", "finetune") if t],
        datasets=[d for d in (data.get("train"),) if _is_hub_dataset(d)] or None,
        eval_results=_eval_results(recipe, metrics) or None,
        **_base_license(model_name, model.get("revision")),
    )
    targets = adapter.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else sorted(targets)
    steps, final_loss = _progress(run)
    card = ModelCard.from_template(
        card_data, template_path=str(TEMPLATE),
        method="QLoRA" if quantized else "LoRA", base_label=base or model_name, task=recipe.get("task"),
        lora_on=recipe.get("adapter", {}).get("lora", True), kind="DoRA" if adapter.get("use_dora") else "LoRA",
        adapter=adapter, target_count=len(targets), target_patterns=_layer_patterns(targets),
        fully_trained=adapter.get("modules_to_save") or [], quantized=quantized,
        data_train=data.get("train"), data_eval=data.get("eval"), steps=steps, final_loss=final_loss,
        settings=list((recipe.get("train") or {}).items()),
        metrics=[(k, f"{v:.4g}" if isinstance(v, float) else v) for k, v in (metrics or {}).items()],
        base_id=base or model_name, embedded=is_embedded_model(base), adapter_id=repo or str(run.resolve()),
        example_prompt=(task or TASKS["vqa"]).example_prompt,
        stages=sorted(p.parent.relative_to(run).as_posix() for p in run.glob("stages/*/adapter_config.json")),
        dual_encoder=bool(task and task.kind == "contrastive"), has_bias=_has_bias(run),
        template=(data.get("templates") or ["a photo of a {label}."])[0],
    )
    path = run / "README.md"
    card.save(path)
    return path


def _has_bias(run: Path) -> bool:
    """Whether the run trained a SigLIP-style bias (its probabilities are then per-label sigmoids)."""
    from safetensors import safe_open

    path = run / SCALARS
    if not path.is_file():
        return False
    with safe_open(str(path), framework="numpy") as handle:
        return "logit_bias" in set(handle.keys())


def _layer_patterns(targets: list[str]) -> list[tuple[str, int]]:
    """One line per layer pattern (layer numbers as *) keeps a 32-layer decoder readable."""
    patterns: dict[str, int] = {}
    for name in targets:
        pattern = re.sub(r"\.\d+\.", ".*.", name)
        patterns[pattern] = patterns.get(pattern, 0) + 1
    return list(patterns.items())


def _progress(run: Path) -> tuple[int | None, float | None]:
    state = run / "trainer_state.json"
    if not state.is_file():
        return None, None
    history = json.loads(state.read_text())
    losses = [e["loss"] for e in history.get("log_history", []) if "loss" in e]
    return history.get("global_step"), losses[-1] if losses else None


def _is_hub_dataset(spec: str | None) -> bool:
    return bool(spec) and bool(HUB_ID.match(spec)) and not spec.endswith(DATA_SUFFIXES) and not Path(spec).exists()


def _base_license(name: str, revision: str | None) -> dict:
    """license (and license_name/link for "other") from the base's README front matter, without network:
    a local folder's README, or one already in the Hub cache."""
    from huggingface_hub import metadata_load, try_to_load_from_cache

    readme = Path(name).expanduser() / "README.md" if name else None
    if not (readme and readme.is_file()) and name and HUB_ID.match(name):
        cached = try_to_load_from_cache(name, "README.md", revision=revision)
        readme = Path(cached) if isinstance(cached, str) else None
    meta = (metadata_load(readme) or {}) if readme and readme.is_file() else {}
    return {key: meta[key] for key in ("license", "license_name", "license_link") if meta.get(key)}


def _eval_results(recipe: dict, metrics: dict | None) -> list:
    from huggingface_hub import EvalResult

    task = TASKS.get(recipe.get("task"))
    spec = (metrics or {}).get("dataset") or recipe.get("data", {}).get("eval") or "held-out data"
    name = spec if _is_hub_dataset(spec) or ":" in spec else Path(spec).name  # no local paths on the Hub
    results = []
    for key, value in (metrics or {}).items():
        if key in ("examples", "examples_per_second") or not isinstance(value, (int, float)):
            continue
        results.append(EvalResult(
            task_type=task.eval_task_type if task else "image-text-to-text",
            dataset_type=spec if _is_hub_dataset(spec) else "custom", dataset_name=name,
            dataset_split=recipe.get("data", {}).get("eval_split"),
            metric_type=re.sub(r"[^\w-]+", "_", key.lower()), metric_name=key, metric_value=value,
        ))
    return results
