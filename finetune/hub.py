"""Share a run: a Hub model card, `push` to the Hub, `merge` into a standalone model, `load_adapter`.

The card and push need only huggingface_hub and the run folder's files (no torch), so `finetune push`
starts fast; merge and load_adapter import torch, transformers and peft when called.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

from finetune.config import parse_yaml
from finetune.errors import FinetuneError

TINY_LLAVA = "tiny-llava"  # finetune.tiny.TINY_LLAVA, repeated so the card never imports torch
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt", ".tsv")
# Top-level files only, so checkpoint-*/, eval-*/, optimizer and trainer state never leave the machine.
SHARED_FILES = (
    "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin",  # peft
    "*.jinja", "chat_template.json", "*processor_config.json", "tokenizer*", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "*.model",  # processor
    "recipe.yaml", "README.md",
)
EVAL_TASK_TYPES = {"vqa": "visual-question-answering", "caption": "image-to-text", "dialogue": "image-text-to-text"}
EXAMPLE_PROMPTS = {"vqa": "What is in the image?", "caption": "Describe the image.",
                   "dialogue": "Tell me about this image."}


# --------------------------------------------------------------------------------------------- model card

def write_model_card(run: Path, metrics: dict | None = None, repo: str | None = None) -> Path:
    """Write `run/README.md`: Hub front matter (base_model, tags, datasets, license, model-index) and a body
    with what was trained, the training settings, the evaluation table and a runnable usage snippet.
    `metrics` defaults to run/eval/metrics.json; `repo` (OWNER/NAME) is what the snippet loads."""
    from huggingface_hub import ModelCard, ModelCardData

    run = _run_folder(run)
    recipe = _raw_recipe(run)
    adapter = json.loads((run / "adapter_config.json").read_text())
    model = recipe.get("model", {})
    model_name = model.get("name") or adapter.get("base_model_name_or_path") or ""
    if metrics is None and (run / "eval" / "metrics.json").is_file():
        metrics = json.loads((run / "eval" / "metrics.json").read_text())
    task = recipe.get("task")
    base = hub_base_id(model_name)
    data = ModelCardData(
        model_name=repo.split("/")[-1] if repo else run.resolve().name,
        base_model=base,  # the Hub rejects local paths here, so a local base without a Hub id is left out
        library_name="peft",
        pipeline_tag="image-text-to-text",
        tags=[t for t in (task, "qlora" if model.get("quantization") == "4bit" else "lora", "finetune") if t],
        datasets=[d for d in (recipe.get("data", {}).get("train"),) if _is_hub_dataset(d)] or None,
        eval_results=_eval_results(recipe, metrics) or None,
        **_base_license(model_name, model.get("revision")),
    )
    adapter_id = repo or str(run.resolve())
    body = "\n\n".join([
        f"# {data.model_name}",
        (f"A {'QLoRA' if model.get('quantization') == '4bit' else 'LoRA'} adapter for `{base or model_name}`, "
         f"fine-tuned{f' for **{task}**' if task else ''} with finetune (transformers + peft)."),
        "## What was trained\n\n" + _adapter_summary(adapter, recipe, run),
        "## Training settings\n\n" + _table(recipe.get("train") or {}, "setting"),
        "## Evaluation\n\n" + (_table(metrics, "metric", number="{:.4g}") if metrics else
                               "Not evaluated yet: `finetune eval RUN` writes eval/metrics.json."),
        "## Usage\n\n" + _snippet(model_name, adapter_id, task, model.get("quantization") == "4bit"),
        ("To get a standalone model (no peft needed), merge the adapter into the base: "
         "`finetune merge RUN --out DIR`."),
    ])
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")
    path = run / "README.md"
    card.save(path)
    return path


def hub_base_id(name: str) -> str | None:
    """The base model's Hub id: the name itself, or recovered from a Hub cache path; None for other folders."""
    if name == TINY_LLAVA:
        return name
    cached = re.search(r"models--([^/]+)--([^/]+)/snapshots/", name)
    if cached:
        return f"{cached[1]}/{cached[2]}"
    return None if Path(name).expanduser().exists() or not name else name


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

    spec = (metrics or {}).get("dataset") or recipe.get("data", {}).get("eval") or "held-out data"
    name = spec if _is_hub_dataset(spec) or ":" in spec else Path(spec).name  # no local paths on the Hub
    results = []
    for key, value in (metrics or {}).items():
        if key in ("examples", "examples_per_second") or not isinstance(value, (int, float)):
            continue
        results.append(EvalResult(
            task_type=EVAL_TASK_TYPES.get(recipe.get("task"), "image-text-to-text"),
            dataset_type=spec if _is_hub_dataset(spec) else "custom", dataset_name=name,
            dataset_split=recipe.get("data", {}).get("eval_split"),
            metric_type=re.sub(r"[^\w-]+", "_", key.lower()), metric_name=key, metric_value=value,
        ))
    return results


def _adapter_summary(adapter: dict, recipe: dict, run: Path) -> str:
    targets = adapter.get("target_modules") or []
    # One line per layer pattern (layer numbers as *) keeps a 32-layer decoder readable.
    patterns: dict[str, int] = {}
    for name in [targets] if isinstance(targets, str) else sorted(targets):
        pattern = re.sub(r"\.\d+\.", ".*.", name)
        patterns[pattern] = patterns.get(pattern, 0) + 1
    lora_on = recipe.get("adapter", {}).get("lora", True)
    data = recipe.get("data", {})
    quantized = recipe.get("model", {}).get("quantization") == "4bit"
    kind = "DoRA" if adapter.get("use_dora") else "LoRA"
    lines = [
        f"- **{kind}**: r={adapter.get('r')}, alpha={adapter.get('lora_alpha')}, dropout={adapter.get('lora_dropout')}"
        f" on {len(targets) if isinstance(targets, list) else 'matching'} Linear layers" if lora_on else
        "- **LoRA**: none (a rank-1 placeholder frozen at zero keeps the run a standard peft adapter)",
        *([f"  - `{p}`" + (f" (x{n})" if n > 1 else "") for p, n in patterns.items()] if lora_on else []),
        "- **Trained fully** (modules_to_save): "
        + (", ".join(f"`{m}`" for m in adapter.get("modules_to_save") or []) or "none"),
        "- **Base weights during training**: "
        + ("4-bit NF4 with double quantization (QLoRA)" if quantized else "not quantized"),
        f"- **Data**: train `{data.get('train')}`" + (f", evaluated on `{data['eval']}`" if data.get("eval") else ""),
    ]
    state = run / "trainer_state.json"
    if state.is_file():
        history = json.loads(state.read_text())
        losses = [e["loss"] for e in history.get("log_history", []) if "loss" in e]
        lines.append(f"- **Steps**: {history.get('global_step')}"
                     + (f", final training loss {losses[-1]:.4f}" if losses else ""))
    return "\n".join(lines)


def _table(values: dict, header: str, number: str = "{}") -> str:
    if not values:
        return "finetune's defaults."
    rows = [f"| `{k}` | {number.format(v) if isinstance(v, float) else v} |" for k, v in values.items()]
    return "\n".join([f"| {header} | value |", "|---|---|", *rows])


def _snippet(base_name: str, adapter_id: str, task: str, quantized: bool) -> str:
    base_id = hub_base_id(base_name) or base_name
    note = ("  # finetune's embedded model: str(finetune.tiny.tiny_llava_path())" if base_id == TINY_LLAVA
            else "")
    qlora = ("\n# Trained as QLoRA: to load the base in 4-bit, pass\n# quantization_config=BitsAndBytesConfig("
             "load_in_4bit=True, bnb_4bit_quant_type=\"nf4\")\n" if quantized else "")
    return f'''```python
base_id = "{base_id}"{note}
adapter_id = "{adapter_id}"

import torch
from peft import PeftModel
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

processor = AutoProcessor.from_pretrained(adapter_id)  # the run's processor, chat template included
{qlora}model = AutoModelForImageTextToText.from_pretrained(base_id, dtype="auto")
model = PeftModel.from_pretrained(model, adapter_id).eval()

image = Image.new("RGB", (448, 448), "white")  # your image: Image.open("photo.jpg")
messages = [{{"role": "user", "content": [
    {{"type": "image", "image": image}},
    {{"type": "text", "text": "{EXAMPLE_PROMPTS.get(task, EXAMPLE_PROMPTS["vqa"])}"}},
]}}]
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                       return_dict=True, return_tensors="pt").to(model.device)
with torch.no_grad():
    output = model.generate(**inputs, max_new_tokens=32, do_sample=False)
print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```'''


# --------------------------------------------------------------------------------------------------- push

def push(run, repo: str, private: bool = False, revision: str | None = None, token: str | None = None,
         endpoint: str | None = None) -> str:
    """Upload the adapter, processor files, recipe.yaml, metrics.json and a fresh model card to the Hub
    in one commit; returns (and prints) the repo URL. `endpoint` defaults to HF_ENDPOINT / huggingface.co."""
    from huggingface_hub import CommitOperationAdd, HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    run = _run_folder(run)
    if not HUB_ID.match(repo or ""):
        raise FinetuneError(f"--repo must be OWNER/NAME (e.g. alice/my-adapter), got {repo!r}")
    token = token or get_token()  # the argument, else HF_TOKEN, else the token `hf auth login` saved
    if not token:
        raise FinetuneError("not logged in to the Hugging Face Hub: run `hf auth login` or set HF_TOKEN")
    api = HfApi(endpoint=endpoint, token=token)
    try:
        url = api.create_repo(repo, private=True if private else None, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo, branch=revision, exist_ok=True)
        write_model_card(run, repo=repo)
        files = shared_files(run)
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=_upload_bytes(name, path, repo, token))
                      for name, path in files.items()]
        api.create_commit(repo, operations, commit_message=f"Upload {run.resolve().name} with finetune",
                          revision=revision)
    except (HfHubHTTPError, ValueError) as err:  # ValueError: e.g. the Hub rejected the card's metadata
        # huggingface_hub's messages name the status and the fix, never the token.
        raise FinetuneError(f"push to {repo} failed: {str(err).strip().splitlines()[0]}") from None
    link = f"{url}/tree/{revision}" if revision and revision != "main" else str(url)
    print(link)
    return link


def shared_files(run: Path) -> dict[str, Path]:
    """path in the repo -> local file: what push uploads (never checkpoints or trainer internals)."""
    run = Path(run)
    files = {p.name: p for pattern in SHARED_FILES for p in sorted(run.glob(pattern)) if p.is_file()}
    if (run / "eval" / "metrics.json").is_file():
        files["metrics.json"] = run / "eval" / "metrics.json"
    return files


def _upload_bytes(name: str, path: Path, repo: str, token: str) -> bytes | Path:
    if name.endswith((".safetensors", ".bin")):
        return path  # weights: streamed from disk
    data = path.read_bytes()
    if token.encode() in data:  # a last guard: a token pasted into a recipe must not be published
        raise FinetuneError(f"{path} contains your Hub token; remove it before pushing")
    if name == "adapter_config.json":
        # Point peft at the base's Hub id instead of this machine's path (e.g. the local cache).
        config = json.loads(data)
        base = hub_base_id(_raw_recipe(path.parent).get("model", {}).get("name")
                           or config.get("base_model_name_or_path") or "")
        if base:
            config["base_model_name_or_path"] = base
            data = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    return data


# ------------------------------------------------------------------------------------ merge / load_adapter

def merge(run, out) -> Path:
    """Fold the adapter into the base weights and save a standalone model + processor to `out`.

    The base is reloaded unquantized (bf16 on a GPU, fp32 on a CPU with dtype auto) even for QLoRA runs:
    merging into 4-bit weights would round the adapter away. For QLoRA the merged model therefore equals
    16-bit base + adapter, not the 4-bit model the adapter was trained against."""
    from peft import PeftModel
    from transformers import AutoProcessor

    from finetune.models import load_model

    run = _run_folder(run)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FinetuneError(f"{out} already exists and is not empty; choose a new folder for the merged model")
    cfg = replace(_model_config(run), quantization="none")
    model, _ = load_model(cfg)
    model = PeftModel.from_pretrained(model, str(run)).merge_and_unload()
    model.save_pretrained(out)  # transformers 5 always writes safetensors
    AutoProcessor.from_pretrained(str(run)).save_pretrained(out)  # chat template included
    return out


def load_adapter(path_or_repo, revision: str | None = None, token: str | None = None):
    """(model, processor) for a run folder or a Hub repo pushed by `push`, in eval mode. The base and its
    quantization come from recipe.yaml when present, else from adapter_config.json."""
    from peft import PeftModel
    from transformers import AutoProcessor

    from finetune.models import load_model

    folder = Path(str(path_or_repo)).expanduser()
    if not folder.exists():
        folder = _download(str(path_or_repo), revision, token)
    folder = _run_folder(folder)
    model, base_processor = load_model(_model_config(folder))
    model = PeftModel.from_pretrained(model, str(folder)).eval()
    has_processor = any(folder.glob("*processor_config.json")) or (folder / "tokenizer_config.json").is_file()
    return model, AutoProcessor.from_pretrained(str(folder)) if has_processor else base_processor


def _download(repo: str, revision: str | None, token: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    if not HUB_ID.match(repo):
        raise FinetuneError(f"{repo} is neither a folder nor a Hub repo id (OWNER/NAME)")
    try:
        return Path(snapshot_download(repo, revision=revision, token=token,
                                      allow_patterns=[*SHARED_FILES, "metrics.json"]))
    except (HfHubHTTPError, LocalEntryNotFoundError) as err:
        raise FinetuneError(f"cannot download adapter {repo!r}: {str(err).strip().splitlines()[0]}") from None


def _model_config(folder: Path):
    from finetune.config import ModelConfig, load_recipe

    if (folder / "recipe.yaml").is_file():
        return load_recipe(folder / "recipe.yaml").model
    adapter = json.loads((folder / "adapter_config.json").read_text())
    if not adapter.get("base_model_name_or_path"):
        raise FinetuneError(f"{folder}: no recipe.yaml and no base_model_name_or_path in adapter_config.json")
    return ModelConfig(name=adapter["base_model_name_or_path"], revision=adapter.get("revision"))


def _run_folder(run) -> Path:
    run = Path(run)
    if not (run / "adapter_config.json").is_file():
        raise FinetuneError(f"{run} is not a run folder (no adapter_config.json): give a finished run's output_dir")
    return run


def _raw_recipe(run: Path) -> dict:
    """recipe.yaml as a plain dict (no validation, so no transformers import); {} when absent."""
    path = Path(run) / "recipe.yaml"
    return (parse_yaml(path.read_text()) or {}) if path.is_file() else {}
