"""Sharing a run, offline: the model card, push to a local fake Hub, merge, loading adapters back."""

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from peft import PeftModel
from transformers import AutoModelForImageTextToText, AutoProcessor

from finetune import train
from finetune.card import write_model_card
from finetune.errors import FinetuneError
from finetune.hub import push
from finetune.run import load_adapter, merge

ROOT = Path(__file__).resolve().parents[1]
FAST = {"data.train": "synthetic:vqa/train?n=4", "data.eval": None, "train.per_device_train_batch_size": 4,
        "train.max_steps": 3, "train.save_strategy": "no", "train.logging_steps": 1, "train.report_to": "none"}
METRICS = {"vqa_accuracy": 0.625, "vqa_accuracy/color": 0.75, "examples": 8, "examples_per_second": 3.5}
TOKEN = "hf_FakeToken0123456789abcdefSECRET"
SHA = "0" * 40  # every commit of the fake Hub
MERGE_ATOL = 1e-4  # fp32 on CPU; measured max |diff| 7.6e-6 (logits ~12): merging only reorders float sums


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = train("demo/vqa", {**FAST, "output_dir": str(tmp_path_factory.mktemp("hub") / "run")})
    (out / "eval").mkdir()
    (out / "eval" / "metrics.json").write_text(json.dumps(METRICS))  # what `finetune eval` writes
    return out


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    return train("demo/vqa", {**FAST, "output_dir": str(tmp_path_factory.mktemp("hub") / "qlora"),
                              "model.quantization": "4bit"})


def model_inputs(processor):
    from finetune.demo.synthetic import make_scenes, render

    messages = [{"role": "user", "content": [{"type": "image", "image": render(make_scenes(1, seed=3)[0])},
                                             {"type": "text", "text": "What colour is the shape?"}]}]
    return dict(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                              return_dict=True, return_tensors="pt"))


def logits_of(model, processor):
    with torch.no_grad():
        return model(**model_inputs(processor)).logits.float()


def base_plus_adapter(tiny_path, run):
    """What the merged model must equal: the base in full precision (never 4-bit) + the adapter."""
    base = AutoModelForImageTextToText.from_pretrained(tiny_path, dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(run)).eval()


# ------------------------------------------------------------------------------------------------ card

def test_card_front_matter_follows_hub_conventions(run):
    card = ModelCard.load(write_model_card(run))
    assert card.data.base_model == "tiny-llava" and card.data.library_name == "peft"
    assert card.data.pipeline_tag == "image-text-to-text" and card.data.tags == ["vqa", "lora", "finetune"]
    assert card.data.datasets is None and card.data.license is None  # synthetic data; tiny-llava has no README
    results = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert results == {"vqa_accuracy": 0.625, "vqa_accuracy/color": 0.75}  # model-index from eval/metrics.json
    assert "model-index" in (run / "README.md").read_text()
    targets = json.loads((run / "adapter_config.json").read_text())["target_modules"]
    assert f"{len(targets)} Linear layers" in card.text and len(targets) > 2  # projector + decoder layers
    assert "r=16, alpha=32" in card.text and "| `max_steps` | 3 |" in card.text


def test_card_for_qlora_hub_data_and_licensed_local_base(run, tmp_path):
    base = tmp_path / "my-base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: mit\n---\n# my base\n")
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("eval"))
    recipe = (copy / "recipe.yaml").read_text().replace("name: tiny-llava", f"name: {base}")
    recipe = recipe.replace("quantization: none", "quantization: 4bit").replace(
        "train: synthetic:vqa/train?n=4", "train: someone/shapes-vqa")
    (copy / "recipe.yaml").write_text(recipe)
    card = ModelCard.load(write_model_card(copy, repo="alice/tiny-vqa"))
    assert card.data.license == "mit" and card.data.datasets == ["someone/shapes-vqa"]
    assert "qlora" in card.data.tags and card.data.base_model is None  # the Hub takes ids, not local paths
    assert card.data.eval_results is None and "model-index" not in (copy / "README.md").read_text()
    assert 'adapter_id = "alice/tiny-vqa"' in card.text


def test_card_snippet_runs_on_the_embedded_default(run, tiny_path, capsys):
    text = write_model_card(run).read_text()
    code = re.search(r"```python\n(.*?)```", text, re.DOTALL).group(1)
    code = re.sub(r'^base_id = .*$', f'base_id = "{tiny_path}"', code, count=1, flags=re.MULTILINE)
    code = re.sub(r'^adapter_id = .*$', f'adapter_id = "{run}"', code, count=1, flags=re.MULTILINE)
    namespace = {}
    exec(compile(code, "model-card-snippet", "exec"), namespace)  # noqa: S102 - our own card
    assert isinstance(namespace["model"], PeftModel)
    assert namespace["output"].shape[1] > namespace["inputs"]["input_ids"].shape[1]  # it generated
    assert capsys.readouterr().out.strip() == namespace["processor"].decode(
        namespace["output"][0, namespace["inputs"]["input_ids"].shape[1]:], skip_special_tokens=True).strip()


# ------------------------------------------------------------------------------------------------ push

class FakeHub(BaseHTTPRequestHandler):
    """The part of the Hub API huggingface_hub 2.4 calls for create_repo + create_branch + create_commit."""

    state: dict  # set per server: requests, repos, branches, commits

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.state["requests"].append((self.command, self.path, dict(self.headers), body))
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self.reply(401, {"error": "Invalid credentials"})
        path = self.path.split("?")[0]
        base = f"http://{self.headers['Host']}"
        if path == "/api/repos/create":
            payload = json.loads(body)
            self.state["repos"].append(payload)
            return self.reply(200, {"url": f"{base}/{payload['organization']}/{payload['name']}"})
        if path == "/api/validate-yaml":
            return self.reply(200, {"errors": [], "warnings": []})
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(branch|preupload|commit)/(.+)", path)
        if not match:
            return self.reply(404, {"error": f"fake hub: no route for {path}"})
        repo, action, revision = match.groups()
        if action == "branch":
            self.state["branches"].append((repo, revision))
            return self.reply(200, {})
        if action == "preupload":  # every file inline: hf_xet and LFS never come into play
            files = json.loads(body)["files"]
            return self.reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                              for f in files]})
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        files = {item["value"]["path"]: base64.b64decode(item["value"]["content"])
                 for item in lines if item["key"] == "file"}
        self.state["commits"].append({"repo": repo, "revision": revision, "header": lines[0], "files": files,
                                      "other": [item["key"] for item in lines[1:] if item["key"] != "file"]})
        return self.reply(200, {"commitUrl": f"{base}/{repo}/commit/{SHA}", "commitOid": SHA})

    def do_GET(self):
        self.state["requests"].append((self.command, self.path, dict(self.headers), b""))
        if self.path == "/api/agent-harnesses":  # huggingface_hub's user-agent telemetry, fetched once a day
            return self.reply(200, {"standardEnvVars": [], "harnesses": {}})
        path = self.path.split("?")[0]
        info = re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/(.+)", path)
        if info:  # snapshot_download's listing of a pushed revision
            files = self.pushed(*info.groups())
            if files is None:
                return self.reply(404, {"error": "Repository not found"})
            return self.reply(200, {"id": info[1], "sha": SHA, "siblings": [{"rfilename": n} for n in files]})
        tree = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)", path)
        if tree:  # ... and of its files
            files = self.pushed(*tree.groups()) or {}
            return self.reply(200, [{"type": "file", "path": n, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                                    for n, d in files.items()])
        return self.serve_file(path, body=True)

    def do_HEAD(self):
        self.state["requests"].append((self.command, self.path, dict(self.headers), b""))
        return self.serve_file(self.path.split("?")[0], body=False)

    def pushed(self, repo: str, revision: str) -> dict | None:
        """The files of the newest commit to `revision` (what a download of it sees)."""
        commits = [c for c in self.state["commits"] if c["repo"] == repo and revision in (c["revision"], SHA)]
        return commits[-1]["files"] if commits else None

    def serve_file(self, path: str, body: bool):
        match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        files = self.pushed(match[1], match[2]) if match else None
        if files is None or match[3] not in files:
            return self.reply(404, {"error": f"fake hub: nothing at {path}"})
        data = files[match[3]]
        self.send_response(200)
        self.send_header("X-Repo-Commit", SHA)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def reply(self, status: int, payload: dict | list):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # keep the test output quiet
        pass


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub.constants

    # In this process: no user-agent telemetry request to the real huggingface.co (there is no network),
    # and a test session run with HF_HUB_OFFLINE=1 may still talk to this local server.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    state = {"requests": [], "repos": [], "branches": [], "commits": []}
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (FakeHub,), {"state": state}))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", state
    server.shutdown()
    server.server_close()


EXPECTED_FILES = {"adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "processor_config.json",
                  "tokenizer.json", "tokenizer_config.json", "recipe.yaml", "metrics.json", "README.md"}


def assert_token_nowhere(run, *texts):
    assert all(TOKEN not in text for text in texts)
    for path in Path(run).rglob("*"):
        assert not path.is_file() or TOKEN.encode() not in path.read_bytes(), path


def test_push_in_a_fresh_process_reads_hf_endpoint_and_hf_token(run, hub, tmp_path):
    url, state = hub
    env = {**{k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")},
           "HF_ENDPOINT": url, "HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_VERBOSITY": "debug"}
    code = "import sys; from finetune.hub import push; push(sys.argv[1], 'alice/tiny-vqa')"
    done = subprocess.run([sys.executable, "-c", code, str(run)], check=False, capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == f"{url}/alice/tiny-vqa"
    assert "About to commit to the hub" in done.stderr  # HF_HUB_VERBOSITY=debug: the logs are checked too
    gets = [(path, headers) for method, path, headers, _ in state["requests"] if method == "GET"]
    assert all(path == "/api/agent-harnesses" and "Authorization" not in headers for path, headers in gets)
    assert state["repos"] == [{"name": "tiny-vqa", "organization": "alice"}]  # public unless --private
    (commit,) = state["commits"]  # one commit, with every file inline
    assert commit["repo"] == "alice/tiny-vqa" and commit["revision"] == "main" and not commit["other"]
    files = commit["files"]
    assert set(files) == EXPECTED_FILES  # no trainer_state.json, training_args.bin, checkpoints, eval/ folder
    assert files["adapter_model.safetensors"] == (run / "adapter_model.safetensors").read_bytes()
    assert files["recipe.yaml"] == (run / "recipe.yaml").read_bytes()
    assert json.loads(files["metrics.json"]) == METRICS
    assert files["README.md"].startswith(b"---\nbase_model: tiny-llava\n") and b'"alice/tiny-vqa"' in files["README.md"]
    pushed_config = json.loads(files["adapter_config.json"])
    assert pushed_config["base_model_name_or_path"] == "tiny-llava"  # not this machine's cache path
    assert pushed_config["target_modules"] == json.loads((run / "adapter_config.json").read_text())["target_modules"]
    assert_token_nowhere(run, done.stdout, done.stderr, *(body.decode(errors="replace")
                                                          for *_, body in state["requests"]))


def test_push_to_a_private_branch_then_load_it_back(run, hub, tmp_path, tiny_path, capsys, caplog):
    url, state = hub
    caplog.set_level("DEBUG", logger="huggingface_hub")  # its debug lines (requests, commit steps) too
    link = push(run, "alice/tiny-vqa", private=True, revision="experiment", token=TOKEN, endpoint=url)
    assert link == f"{url}/alice/tiny-vqa/tree/experiment" and link in capsys.readouterr().out
    assert state["repos"][0]["visibility"] == "private"
    assert state["branches"] == [("alice/tiny-vqa", "experiment")]
    assert [c["revision"] for c in state["commits"]] == ["experiment"]
    out, err = capsys.readouterr()
    assert "About to commit to the hub" in caplog.text
    assert_token_nowhere(run, out, err, caplog.text)
    # What a user downloads: only the pushed files, and load_adapter finds the base from them.
    downloaded = tmp_path / "download"
    downloaded.mkdir()
    for name, data in state["commits"][0]["files"].items():
        (downloaded / name).write_bytes(data)
    model, processor = load_adapter(downloaded)
    reference = base_plus_adapter(tiny_path, run)
    assert torch.equal(logits_of(model, processor), logits_of(reference, processor))


def hub_env(url, tmp_path):
    """A fresh process that talks to the fake Hub (no token: the pushed repos are public)."""
    drop = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "HF_ENDPOINT": url,
            "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1"}


def cli(*args, env, cwd, stdin=None):
    return subprocess.run([sys.executable, "-m", "finetune", *args], input=stdin, capture_output=True, text=True,
                          check=False, cwd=cwd, env=env, timeout=600)


@pytest.mark.slow
def test_eval_predict_and_chat_take_a_hub_repo_id(run, hub, tmp_path, shapes_image):
    from finetune.evaluation import predict

    url, _ = hub
    push(run, "alice/tiny-vqa", token=TOKEN, endpoint=url)
    image = tmp_path / "shapes.png"
    shapes_image.save(image)
    env = hub_env(url, tmp_path)
    done = cli("eval", "alice/tiny-vqa", "data.eval=synthetic:vqa/eval?n=4", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    # Written beside the caller, never into the download cache; the card of the cache copy is left alone.
    metrics = json.loads((tmp_path / "runs" / "alice--tiny-vqa" / "eval" / "metrics.json").read_text())
    assert metrics["examples"] == 16 and "vqa_accuracy" in done.stdout
    question = "What color are the shapes?"
    answer = cli("predict", "alice/tiny-vqa", "--image", str(image), "--prompt", question, env=env, cwd=tmp_path)
    assert answer.returncode == 0, answer.stderr[-2000:]
    assert answer.stdout.strip() == predict(run, str(image), question)  # the pushed run answers as the local one
    talk = cli("chat", "alice/tiny-vqa", "--image", str(image), stdin=f"{question}\n/quit\n", env=env, cwd=tmp_path)
    assert talk.returncode == 0 and talk.stdout.count("model> ") == 1, talk.stderr[-2000:]
    missing = cli("eval", "alice/no-such-run", env=env, cwd=tmp_path)
    assert missing.returncode == 2 and "cannot download run 'alice/no-such-run'" in missing.stderr


def test_a_downloaded_recipe_cannot_run_code_or_read_local_files(run, hub, tmp_path):
    url, _ = hub
    evil = tmp_path / "evil"
    shutil.copytree(run, evil)
    recipe = (evil / "recipe.yaml").read_text()
    recipe = recipe.replace("trust_remote_code: false", "trust_remote_code: true")
    recipe = recipe.replace("adapter: null", f"adapter: {run}", 1)
    recipe = recipe.replace("image_root: null", "image_root: /etc")
    recipe = re.sub(r"(?m)^  train: .*$", "  train: /etc/passwd.jsonl", recipe, count=1)
    assert recipe.count("/etc") == 2 and "trust_remote_code: true" in recipe and f"adapter: {run}" in recipe
    (evil / "recipe.yaml").write_text(recipe)
    push(evil, "mallory/evil", token=TOKEN, endpoint=url)
    code = ("import json; from finetune.run import Run; r = Run.open('mallory/evil'); m, d = r.recipe.model, "
            "r.recipe.data; print(json.dumps([m.trust_remote_code, m.adapter, d.train, d.image_root, m.name]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=tmp_path,
                          env=hub_env(url, tmp_path), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout) == [False, None, None, None, "tiny-llava"]


def test_push_mistakes_are_one_line(run, hub, tmp_path, monkeypatch):
    import huggingface_hub.constants

    url, state = hub
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(FinetuneError, match=r"hf auth login.*HF_TOKEN"):
        push(run, "alice/tiny-vqa", endpoint=url)
    with pytest.raises(FinetuneError, match="OWNER/NAME"):
        push(run, "no-owner", token=TOKEN, endpoint=url)
    with pytest.raises(FinetuneError, match="not a run folder"):
        push(tmp_path, "alice/tiny-vqa", token=TOKEN, endpoint=url)
    with pytest.raises(FinetuneError, match="push to alice/tiny-vqa failed: .*401"):
        push(run, "alice/tiny-vqa", token="hf_wrong", endpoint=url)
    assert not state["commits"]


# ----------------------------------------------------------------------------------------------- merge

def check_merged_folder(out: Path):
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and "peft" not in json.dumps(config).lower()
    assert not (out / "adapter_config.json").exists()
    for name in ("model.safetensors", "chat_template.jinja", "processor_config.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert not any("lora_" in k or "base_layer" in k for k in model.state_dict())
    processor = AutoProcessor.from_pretrained(out)
    assert processor.chat_template and "<|im_start|>" in processor.chat_template
    return model, processor


def test_merge_a_lora_run_equals_base_plus_adapter(run, tmp_path, tiny_path):
    merged, processor = check_merged_folder(merge(run, tmp_path / "merged"))
    expected = logits_of(base_plus_adapter(tiny_path, run), processor)
    base = logits_of(AutoModelForImageTextToText.from_pretrained(tiny_path).eval(), processor)
    assert (expected - base).abs().max() > 1e-3  # the adapter matters, so the comparison means something
    torch.testing.assert_close(logits_of(merged, processor), expected, atol=MERGE_ATOL, rtol=0)
    with pytest.raises(FinetuneError, match="not empty"):
        merge(run, tmp_path / "merged")
    with pytest.raises(FinetuneError, match="not a run folder"):
        merge(tmp_path / "merged", tmp_path / "other")


def test_merge_a_qlora_run_into_full_precision_and_load_without_peft(qlora_run, tmp_path, tiny_path):
    merged, processor = check_merged_folder(merge(qlora_run, tmp_path / "merged"))
    assert all(p.dtype == torch.float32 for p in merged.parameters())  # CPU + dtype auto: kept fp32, never 4-bit
    expected = logits_of(base_plus_adapter(tiny_path, qlora_run), processor)
    merged_logits = logits_of(merged, processor)
    torch.testing.assert_close(merged_logits, expected, atol=MERGE_ATOL, rtol=0)
    torch.save(model_inputs(processor), tmp_path / "inputs.pt")
    script = (
        "import sys\nsys.modules['peft'] = None  # as if peft were not installed\n"
        "import torch\nfrom transformers import AutoModelForImageTextToText\n"
        "from transformers.utils import is_peft_available\nassert not is_peft_available()\n"
        "model = AutoModelForImageTextToText.from_pretrained(sys.argv[1]).eval()\n"
        "with torch.no_grad():\n    logits = model(**torch.load(sys.argv[2])).logits\n"
        "torch.save(logits, sys.argv[3])\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "merged"), str(tmp_path / "inputs.pt"),
                           str(tmp_path / "logits.pt")], check=False, capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), merged_logits, atol=0, rtol=0)


# ----------------------------------------------------------------------------------------- load_adapter

def test_projector_trained_fully_loads_with_plain_peft_and_load_adapter(tmp_path, tiny_path):
    stage = train("demo/vqa", {**FAST, "output_dir": str(tmp_path / "projector"), "train.max_steps": 2,
                               "adapter.lora": False, "adapter.train_fully": ["projector"]})
    plain = base_plus_adapter(tiny_path, stage)
    model, processor = load_adapter(stage)
    assert torch.equal(logits_of(model, processor), logits_of(plain, processor))
    base = AutoModelForImageTextToText.from_pretrained(tiny_path).eval()
    assert not torch.equal(logits_of(base, processor), logits_of(plain, processor))  # the projector was trained
    card = write_model_card(stage).read_text()
    assert "`model.multi_modal_projector`" in card and "LoRA**: none" in card
    with pytest.raises(FinetuneError, match="neither a folder nor a Hub repo id"):
        load_adapter(tmp_path / "missing")


@pytest.mark.slow
def test_a_staged_run_loads_and_pushes_complete(random_tiny, hub, tmp_path):
    """Stage 2 was trained on base + stage 1's projector: the run carries stage 1, so base + the run's files is
    the model that was trained, from the folder, from the Hub, and as the card's snippet builds it."""
    url, state = hub
    small = {**FAST, "model.name": str(random_tiny), "train.max_steps": 2}
    stage1 = train("demo/vqa", {**small, "output_dir": str(tmp_path / "s1"), "adapter.lora": False,
                                "adapter.train_fully": ["projector"]})
    stage2 = train("demo/vqa", {**small, "output_dir": str(tmp_path / "s2"), "model.adapter": str(stage1)})
    assert (stage2 / "stages" / "01" / "adapter_model.safetensors").is_file()
    base = AutoModelForImageTextToText.from_pretrained(random_tiny)
    expected = PeftModel.from_pretrained(PeftModel.from_pretrained(base, str(stage1)).merge_and_unload(),
                                         str(stage2)).eval()
    processor = AutoProcessor.from_pretrained(stage2)
    model, _ = load_adapter(stage2)
    torch.testing.assert_close(logits_of(model, processor), logits_of(expected, processor), atol=1e-5, rtol=0)
    shutil.rmtree(stage1)  # the run no longer needs the folder it was staged on
    model, _ = load_adapter(stage2)
    torch.testing.assert_close(logits_of(model, processor), logits_of(expected, processor), atol=1e-5, rtol=0)
    push(stage2, "alice/staged", token=TOKEN, endpoint=url)
    files = state["commits"][-1]["files"]
    assert {"stages/01/adapter_config.json", "stages/01/adapter_model.safetensors"} <= set(files)
    assert "subfolder=stage" in files["README.md"].decode()
    downloaded = tmp_path / "download"
    for name, data in files.items():
        (downloaded / name).parent.mkdir(parents=True, exist_ok=True)
        (downloaded / name).write_bytes(data)
    model, _ = load_adapter(downloaded)
    torch.testing.assert_close(logits_of(model, processor), logits_of(expected, processor), atol=1e-5, rtol=0)
