"""Recipes: typed dataclasses loaded from YAML plus dotted `key=value` overrides.

YAML keys equal the dataclass field names. The `train:` section is passed straight to
`transformers.TrainingArguments`, so every one of its fields is reachable from a recipe.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from finetune.errors import ConfigError
from finetune.tasks import TASKS


def _recipes_dir() -> Path:
    """Package data (the repository's recipes/ folder, installed as finetune.recipes), so wheels carry the recipes;
    a source checkout used without installing it reads the folder itself."""
    try:
        return Path(str(importlib.resources.files("finetune.recipes")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "recipes"


RECIPES_DIR = _recipes_dir()
FORMATS = ("auto", "llava", "messages", "vqa", "caption", "pairs", "classification")
# PyYAML (YAML 1.1) reads `1e-4` as a string; everyone writes learning rates that way.
SCIENTIFIC = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


class _Yaml12Loader(yaml.SafeLoader):
    """YAML 1.1 turns `no`, `off`, `yes`, `on` into booleans (`save_strategy: no` -> False); YAML 1.2,
    and this loader, keep them strings and accept only true/false."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _first in "tTfF":
    _Yaml12Loader.yaml_implicit_resolvers.setdefault(_first, []).insert(
        0, ("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"))
    )


def parse_yaml(text: str):
    return yaml.load(text, Loader=_Yaml12Loader)


@dataclass
class ModelConfig:
    name: str = "tiny-llava"  # Hub id, local folder, or an embedded demo model (finetune.demo.EMBEDDED_MODELS)
    quantization: str = "none"  # none | 4bit (NF4 + double quantization, decoder only)
    dtype: str = "auto"  # auto: bf16 on a GPU that has it, else fp32 | float32 | bfloat16 | float16
    revision: str | None = None
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    adapter: str | None = None  # an earlier run to merge into the base first (staged training)
    # Options for AutoProcessor.from_pretrained, e.g. {max_pixels: 802816} (Qwen2-VL), {do_image_splitting: false}
    # (Idefics3/SmolVLM), {image_grid_pinpoints: [[336, 672], ...]} (LLaVA-NeXT); saved with the run.
    processor: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        _check_choice("model.quantization", self.quantization, ("none", "4bit"))
        _check_choice("model.dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))


@dataclass
class AdapterConfig:
    lora: bool = True  # false + train_fully: [projector] is LLaVA's stage 1
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    use_dora: bool = False
    use_rslora: bool = False
    targets: str | list[str] = "auto"  # auto: projector + decoder linears; or module-name regexes
    vision_tower: bool = False  # also put LoRA on the vision tower's linears
    train_fully: list[str] = field(default_factory=list)  # parts or module names trained in full
    mlp: bool = False  # dual encoders (CLIP, SigLIP): LoRA on the towers' MLPs too, not only attention
    freeze: list[str] = field(default_factory=list)  # dual encoders: towers left as they are (vision, text)

    def __post_init__(self):
        for tower in self.freeze:
            _check_choice("adapter.freeze", tower, ("vision", "text"))
        if self.r < 1:
            raise ConfigError(f"adapter.r must be >= 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"adapter.dropout must be in [0, 1), got {self.dropout}")
        if not self.lora and not self.train_fully:
            raise ConfigError("adapter.lora is false and adapter.train_fully is empty: nothing would train")


@dataclass
class DataConfig:
    train: str | None = None  # file, folder, saved HF dataset, Hub dataset name, or synthetic:KIND/SPLIT
    eval: str | None = None
    image_root: str | None = None  # default: the data file's folder
    format: str = "auto"
    max_length: int = 2048
    # auto: drop rows longer than max_length with a warning, but fail when more than 1% would go (a max_length
    # too small for the model's image tokens); drop: drop any number; fail: fail on the first
    on_too_long: str = "auto"
    on_error: str = "fail"  # fail | skip: what an unusable row (missing image, no reply ...) does
    columns: dict[str, str] = field(default_factory=dict)  # our name -> your column, e.g. {question: q}
    prompt: str | None = None  # instruction for caption rows (task default when unset)
    system_prompt: str | None = None
    # task retrieval, classification rows: class names become texts through these (one chosen per epoch in
    # training; their embeddings averaged in zero-shot evaluation, CLIP's prompt ensembling)
    templates: list[str] = field(default_factory=lambda: ["a photo of a {label}."])
    split: str = "train"  # split of a Hub or saved DatasetDict for data.train
    eval_split: str | None = None  # split for data.eval (default: validation, then test)
    num_proc: int | None = None  # processes for the up-front data check (default: the machine's cores)
    cache: bool = True  # keep the data check's results under the cache folder, so the next run skips the check
    # auto: several examples per row where the model family allows it (finetune.data.packing), else padding;
    # true: pack, and fail on a family that cannot; false: always pad
    packing: str | bool = "auto"

    def __post_init__(self):
        if isinstance(self.packing, str) and self.packing.lower() in ("true", "false"):
            self.packing = self.packing.lower() == "true"
        if not isinstance(self.packing, bool):
            _check_choice("data.packing", self.packing, ("auto", True, False))
        _check_choice("data.format", self.format, FORMATS)
        if self.num_proc is not None and self.num_proc < 1:
            raise ConfigError(f"data.num_proc must be at least 1, got {self.num_proc}")
        _check_choice("data.on_too_long", self.on_too_long, ("auto", "drop", "fail"))
        _check_choice("data.on_error", self.on_error, ("fail", "skip"))
        if self.max_length < 8:
            raise ConfigError(f"data.max_length must be at least 8, got {self.max_length}")
        if not self.templates or any("{label}" not in t for t in self.templates):
            raise ConfigError(f"data.templates must each contain {{label}}, got {self.templates!r}")


@dataclass
class EvalConfig:
    output_dir: str | None = None  # default: <run>/eval (a run) or <output_dir>/eval-base (a recipe)
    batch_size: int = 16
    max_new_tokens: int | None = None  # default: the task's (finetune.tasks.TASKS)
    max_examples: int | None = None
    before_after: bool = False  # train() also scores the base model first and prints both numbers
    report_examples: int = 200  # report.html's gallery: at most this many held-out examples, every wrong one first

    def __post_init__(self):
        if self.report_examples < 0:
            raise ConfigError(f"eval.report_examples must be >= 0, got {self.report_examples}")


@dataclass
class Recipe:
    task: str = "vqa"
    output_dir: str = "runs/run"
    seed: int = 42
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: dict[str, Any] = field(default_factory=dict)  # any transformers.TrainingArguments field
    description: str = ""

    def __post_init__(self):
        _check_choice("task", self.task, tuple(TASKS))
        self.train = {k: _number(v) for k, v in self.train.items()}
        valid = training_argument_names() | {"group_by_length"}
        for key in self.train:
            if key not in valid:
                raise ConfigError(_unknown_key_message(f"train.{key}", [f"train.{k}" for k in valid]))
        if "output_dir" in self.train:
            raise ConfigError("train.output_dir is set by the top-level output_dir key; use output_dir=...")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def training_argument_names() -> set[str]:
    from transformers import TrainingArguments

    return {f.name for f in dataclasses.fields(TrainingArguments) if f.init}


def find_recipe(name_or_path: str | Path) -> Path:
    """A recipe path, or a shipped recipe's short name (`demo/vqa`, `vqa`)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = RECIPES_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    names = [p.relative_to(RECIPES_DIR).with_suffix("").as_posix() for p in shipped_recipes()]
    hint = difflib.get_close_matches(str(name_or_path), names, n=3)
    raise ConfigError(
        f"recipe not found: {name_or_path}" + (f" (did you mean {', '.join(hint)}?)" if hint else "")
        + " - `finetune recipes` lists the shipped ones"
    )


def shipped_recipes() -> list[Path]:
    return sorted(RECIPES_DIR.rglob("*.yaml"))


def load_recipe(source: str | Path | dict | Recipe, overrides: list[str] | dict | None = None) -> Recipe:
    """Build a validated Recipe from a YAML path (or shipped name), a dict, or a Recipe, plus overrides.

    `overrides` is a list of `dotted.key=value` strings (values parsed as YAML) or a dict of
    dotted keys to values (Python API: `train(recipe, **{"data.train": ...})`).
    """
    if isinstance(source, Recipe):
        raw = source.to_dict()
    elif isinstance(source, dict):
        raw = dict(source)
    else:
        path = find_recipe(source)
        try:
            raw = parse_yaml(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}".splitlines()[0]) from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(raw).__name__}")
    for key, value in parse_overrides(overrides).items():
        _set_dotted(raw, key, value)
    return _build(Recipe, raw, prefix="")


def save_recipe(recipe: Recipe, path: Path) -> None:
    path.write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))


def parse_overrides(overrides) -> dict[str, Any]:
    if not overrides:
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    parsed = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. data.train=my.jsonl)")
        parsed[key.strip()] = _number(parse_yaml(value)) if value.strip() else None
    return parsed


def _number(value: Any) -> Any:
    return float(value) if isinstance(value, str) and SCIENTIFIC.match(value) else value


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = raw
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {key}: {'.'.join(parents[: i + 1])} is not a section")
        node = child
    node[leaf] = value


def _build(cls, raw: dict, prefix: str):
    """Instantiate a dataclass from a dict, naming the dotted key of any bad key or value."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.')} must be a section (mapping), got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(_unknown_key_message(prefix + key, _all_keys(cls, prefix)))
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value or {}, prefix + key + ".")
        else:
            kwargs[key] = _coerce(prefix + key, value, hint)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix.rstrip('.') or 'recipe'}: {err}") from None


def _coerce(key: str, value: Any, hint) -> Any:
    """Check a value against a field's type; accept ints for floats and scalars for str."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{key} needs a value")
    for option in options:
        origin = typing.get_origin(option) or option
        if origin is bool and isinstance(value, bool):
            return value
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if origin is list and isinstance(value, list):
            return value
        if origin is dict and isinstance(value, dict):
            return value
    for option in options:
        origin = typing.get_origin(option) or option
        if origin is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if origin is list and isinstance(value, str):
            return [value]
    wanted = " or ".join(getattr(o, "__name__", str(o)) for o in options if o is not type(None))
    raise ConfigError(f"{key} must be {wanted}, got {value!r} ({type(value).__name__})")


def _all_keys(cls, prefix: str) -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _all_keys(hints[f.name], prefix + f.name + ".")
    return keys


def _unknown_key_message(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown recipe key {key!r}{hint}"


def _check_choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}")
