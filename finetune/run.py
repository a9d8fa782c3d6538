"""A finished run, from a local folder or a Hub repo, opened one way for every command.

`Run.open(path_or_hub_id)` gives the resolved recipe (hence the base model), the processor and the adapter
folder; `.load()` returns (model, processor) ready for inference; `.merge(out)` writes a standalone model.
eval, predict, chat, merge, push, load_adapter and staged training (`model.adapter`) all go through here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from finetune.config import Recipe, load_recipe, parse_yaml
from finetune.demo import is_embedded_model, is_synthetic
from finetune.errors import FinetuneError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")  # peft
STAGES = "stages"  # a staged run's earlier adapters, bundled so the run loads complete from anywhere
SCALARS = "logit_scale.safetensors"  # a dual encoder's trained temperature (and bias): peft saves no bare parameters
# A run's shareable files: what push uploads and what a download fetches (never checkpoints, eval folders,
# optimizer or trainer internals).
RUN_FILES = (
    *ADAPTER_FILES, SCALARS, *(f"{STAGES}/*/{name}" for name in (*ADAPTER_FILES, SCALARS)),
    "*.jinja", "chat_template.json", "*processor_config.json", "tokenizer*", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "*.model",  # processor
    "recipe.yaml", "README.md",
)


def is_run_folder(path) -> bool:
    return isinstance(path, (str, Path)) and (Path(path).expanduser() / "adapter_config.json").is_file()


@dataclass
class Run:
    folder: Path  # holds adapter_config.json (for a Hub repo: the downloaded snapshot)
    recipe: Recipe  # as trained, plus the caller's overrides; sanitised when downloaded
    source: str  # what the caller named: a folder or OWNER/NAME
    remote: bool = False

    @classmethod
    def open(cls, target, revision: str | None = None, token: str | None = None,
             overrides: list[str] | dict | None = None) -> Run:
        """A run folder or a Hub repo pushed by `finetune push`. A downloaded recipe is not trusted: it never
        enables remote code or reads local paths of the machine that trained it (the caller's overrides can)."""
        folder = Path(str(target)).expanduser()
        remote = not folder.exists()
        if remote:
            if not HUB_ID.match(str(target)):
                raise FinetuneError(f"{target} is neither a folder nor a Hub repo id (OWNER/NAME)")
            folder = download(str(target), revision, token)
        if not is_run_folder(folder):
            raise FinetuneError(f"{target} is not a run folder (no adapter_config.json): give a finished run's "
                                "output_dir or a Hub repo pushed with `finetune push`")
        raw = read_raw_recipe(folder)
        if remote:
            raw = _untrusted(raw, folder)
        elif not raw:
            raw = {"model": _model_from_adapter_config(folder)}
        from finetune.config import parse_overrides

        extra = parse_overrides(overrides)
        try:
            recipe = load_recipe(raw, extra)
        except FinetuneError as err:
            raise FinetuneError(f"{target}: {err}") from None
        return cls(folder=folder, recipe=recipe, source=str(target), remote=remote)

    @property
    def eval_dir(self) -> Path:
        """Where `finetune eval` writes: the run folder, or for a Hub repo runs/OWNER--NAME/eval (never the cache)."""
        if self.recipe.eval.output_dir:
            return Path(self.recipe.eval.output_dir)
        return (Path("runs") / self.source.replace("/", "--") if self.remote else self.folder) / "eval"

    def processor(self):
        """The processor saved with the run (chat template included), else the base model's."""
        from transformers import AutoProcessor

        from finetune.models import load_processor

        saved = any(self.folder.glob("*processor_config.json")) or (self.folder / "tokenizer_config.json").is_file()
        return AutoProcessor.from_pretrained(str(self.folder)) if saved else load_processor(self.recipe.model)

    def adapter_chain(self) -> list[Path]:
        """The adapter folders to apply in order: earlier stages (bundled in stages/, or for an older local run
        its model.adapter), then this run's own."""
        bundled = sorted(p for p in (self.folder / STAGES).glob("*") if is_run_folder(p))
        if bundled:
            return [*bundled, self.folder]
        earlier = Run.open(self.recipe.model.adapter).adapter_chain() if self.recipe.model.adapter else []
        return [*earlier, self.folder]

    def load(self, device=None):
        """(model, processor) in eval mode, on this process's GPU when there is one (or `device`)."""
        from peft import PeftModel

        from finetune.models import inference_device, load_model

        model, _ = load_model(self.recipe.model, device=device or inference_device(), dual_encoder=self.dual_encoder)
        *earlier, own = self.adapter_chain()
        model = PeftModel.from_pretrained(fold(model, earlier), str(own)).eval()
        load_scalars(model.get_base_model(), own)
        return model, self.processor()

    @property
    def dual_encoder(self) -> bool:
        from finetune.tasks import TASKS

        return TASKS[self.recipe.task].kind == "contrastive"

    def merge(self, out) -> Path:
        """Fold the adapter into the base weights and save a standalone model + processor to `out`.

        The base is reloaded unquantized (bf16 on a GPU, fp32 on a CPU with dtype auto) even for QLoRA runs:
        merging into 4-bit weights would round the adapter away. For QLoRA the merged model therefore equals
        16-bit base + adapter, not the 4-bit model the adapter was trained against."""
        from dataclasses import replace

        from finetune.models import load_model

        out = Path(out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise FinetuneError(f"{out} already exists and is not empty; choose a new folder for the merged model")
        model, _ = load_model(replace(self.recipe.model, quantization="none"), dual_encoder=self.dual_encoder)
        model = fold(model, self.adapter_chain())
        model.save_pretrained(out)  # transformers 5 always writes safetensors
        self.processor().save_pretrained(out)  # chat template included
        return out


def fold(model, adapters: list[Path]):
    """Merge each adapter folder into the weights, in order (staged training: stage 1's projector, then ...)."""
    from peft import PeftModel

    for folder in adapters:
        model = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
        load_scalars(model, folder)
    return model


def save_scalars(model, out: Path) -> None:
    """A dual encoder's logit_scale (and SigLIP's logit_bias), which training changed and peft does not save."""
    from safetensors.torch import save_file

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    tensors = {name: getattr(base, name).detach().float().cpu().reshape(-1).contiguous()
               for name in ("logit_scale", "logit_bias") if getattr(base, name, None) is not None}
    if tensors:
        save_file(tensors, str(Path(out) / SCALARS))


def load_scalars(model, folder: Path) -> None:
    from safetensors.torch import load_file

    if (Path(folder) / SCALARS).is_file():
        for name, value in load_file(str(Path(folder) / SCALARS)).items():
            parameter = getattr(model, name)
            parameter.data.copy_(value.reshape(parameter.shape).to(parameter.dtype))


def fold_earlier_runs(model, recipe: Recipe):
    """Staged training: the base for this stage is the base with every earlier stage merged in."""
    return fold(model, Run.open(recipe.model.adapter).adapter_chain()) if recipe.model.adapter else model


def bundle_earlier_runs(recipe: Recipe, out: Path) -> None:
    """Copy the earlier stages' adapters into out/stages/NN, so the run loads (and pushes) complete."""
    import shutil

    if not recipe.model.adapter:
        return
    for number, folder in enumerate(Run.open(recipe.model.adapter).adapter_chain(), start=1):
        stage = out / STAGES / f"{number:02d}"
        stage.mkdir(parents=True, exist_ok=True)
        for name in (*ADAPTER_FILES, SCALARS):
            if (folder / name).is_file():
                shutil.copy2(folder / name, stage / name)


def load_adapter(path_or_repo, revision: str | None = None, token: str | None = None, device=None):
    """(model, processor) for a run folder or a Hub repo pushed by `finetune push`, in eval mode, on the GPU
    when there is one. The base and its quantization come from recipe.yaml, else from adapter_config.json."""
    return Run.open(path_or_repo, revision=revision, token=token).load(device)


def merge(run, out, revision: str | None = None, token: str | None = None) -> Path:
    """Base + adapter of a run folder or Hub repo, merged into a plain model folder `out` (see Run.merge)."""
    return Run.open(run, revision=revision, token=token).merge(out)


def download(repo: str, revision: str | None, token: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, revision=revision, token=token,
                                      allow_patterns=[*RUN_FILES, "metrics.json"]))
    except (HfHubHTTPError, LocalEntryNotFoundError) as err:
        raise FinetuneError(f"cannot download run {repo!r}: {str(err).strip().splitlines()[0]}") from None


def read_raw_recipe(folder: Path) -> dict:
    """recipe.yaml as a plain dict (no validation, so no transformers import); {} when absent."""
    path = Path(folder) / "recipe.yaml"
    return (parse_yaml(path.read_text()) or {}) if path.is_file() else {}


def hub_base_id(name: str | None) -> str | None:
    """The base model's Hub id: the name itself, an embedded demo name, or recovered from a Hub cache path;
    None for other local folders."""
    if not name:
        return None
    if is_embedded_model(name):
        return name
    cached = re.search(r"models--([^/]+)--([^/]+)/snapshots/", name)
    if cached:
        return f"{cached[1]}/{cached[2]}"
    return None if Path(name).expanduser().exists() else name


def _model_from_adapter_config(folder: Path) -> dict:
    adapter = json.loads((folder / "adapter_config.json").read_text())
    if not adapter.get("base_model_name_or_path"):
        raise FinetuneError(f"{folder}: no recipe.yaml and no base_model_name_or_path in adapter_config.json")
    return {"name": adapter["base_model_name_or_path"], "revision": adapter.get("revision")}


def _untrusted(raw: dict, folder: Path) -> dict:
    """A downloaded recipe, stripped of what could run code or read this machine's files."""
    kept = {key: raw[key] for key in ("task", "adapter", "train", "seed") if key in raw}
    model = {k: v for k, v in (raw.get("model") or {}).items() if k not in ("adapter", "trust_remote_code")}
    if not _is_remote_name(model.get("name")):
        model["name"] = _model_from_adapter_config(folder)["name"]  # push points it at the base's Hub id
    if not _is_remote_name(model["name"]):
        raise FinetuneError(f"the run's base model {model['name']!r} is not a Hub id; pass model.name=BASE")
    kept["model"] = model
    kept["eval"] = {k: v for k, v in (raw.get("eval") or {}).items() if k != "output_dir"}
    kept["data"] = {k: v for k, v in (raw.get("data") or {}).items()
                    if k not in ("train", "eval", "image_root") or is_synthetic(v) or _is_remote_name(v)}
    return kept


def _is_remote_name(name) -> bool:
    """An embedded demo name or something only the Hub can resolve (never a path that exists here)."""
    if is_embedded_model(name):
        return True
    return (isinstance(name, str) and bool(HUB_ID.match(name)) and not Path(name).exists()
            and not name.endswith((".json", ".jsonl", ".csv", ".parquet", ".txt", ".tsv")))
