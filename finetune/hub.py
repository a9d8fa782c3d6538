"""`finetune push`: a run's adapter, processor, recipe, metrics and model card to the Hub in one commit.

Needs only huggingface_hub and the run folder's files (no torch), so it starts fast. Downloading a pushed
run is `finetune.run.Run.open("OWNER/NAME")`.
"""

from __future__ import annotations

import json
from pathlib import Path

from finetune.card import write_model_card
from finetune.errors import FinetuneError
from finetune.run import HUB_ID, RUN_FILES, hub_base_id, is_run_folder, read_raw_recipe


def push(run, repo: str, private: bool = False, revision: str | None = None, token: str | None = None,
         endpoint: str | None = None) -> str:
    """Upload the adapter, processor files, recipe.yaml, metrics.json and a fresh model card to the Hub
    in one commit; returns (and prints) the repo URL. `endpoint` defaults to HF_ENDPOINT / huggingface.co."""
    from huggingface_hub import CommitOperationAdd, HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    run = Path(run)
    if not is_run_folder(run):
        raise FinetuneError(f"{run} is not a run folder (no adapter_config.json): give a finished run's output_dir")
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
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=_upload_bytes(name, path, token))
                      for name, path in shared_files(run).items()]
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
    files = {p.relative_to(run).as_posix(): p for pattern in RUN_FILES for p in sorted(run.glob(pattern))
             if p.is_file()}
    if (run / "eval" / "metrics.json").is_file():
        files["metrics.json"] = run / "eval" / "metrics.json"
    return files


def _upload_bytes(name: str, path: Path, token: str) -> bytes | Path:
    if name.endswith((".safetensors", ".bin")):
        return path  # weights: streamed from disk
    data = path.read_bytes()
    if token.encode() in data:  # a last guard: a token pasted into a recipe must not be published
        raise FinetuneError(f"{path} contains your Hub token; remove it before pushing")
    if name == "adapter_config.json":
        # Point peft at the base's Hub id instead of this machine's path (e.g. the local cache).
        config = json.loads(data)
        base = hub_base_id(read_raw_recipe(path.parent).get("model", {}).get("name")
                           or config.get("base_model_name_or_path") or "")
        if base:
            config["base_model_name_or_path"] = base
            data = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    return data
