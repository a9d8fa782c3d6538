"""Bad data found before training, crashes and kills that lose no work, secrets that stay secret."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune import train
from finetune.errors import FinetuneError

ROOT = Path(__file__).resolve().parents[1]
RUN = ["data.train=synthetic:vqa/train?n=16", "data.eval=null", "train.per_device_train_batch_size=8",
       "train.logging_steps=1", "eval.before_after=false"]


def cli(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "finetune", *args], capture_output=True, text=True, check=False,
                          cwd=ROOT, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, **kw)


def test_data_check_reports_each_bad_row(tmp_path, shapes_image):
    shapes_image.save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rows = [{"image": "ok.png", "question": "Q?", "answer": "red"},
            {"image": "gone.png", "question": "Q?", "answer": "red"},
            {"image": "broken.png", "question": "Q?", "answer": "red"},
            {"image": "ok.png", "conversations": [{"from": "human", "value": "<image>"}]},
            {"image": "ok.png", "question": "Q?", "answer": "red"}]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{oops\n")
    done = cli("data", "check", "demo/vqa", f"data.train={data}", "data.eval=null")
    assert done.returncode == 1, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert f"{data}:2: image not found: {tmp_path / 'gone.png'}" in lines
    assert any(line.startswith(f"{data}:3: unreadable image") for line in lines)
    assert f"{data}:4: no assistant reply in the row" in lines
    assert any(line.startswith(f"{data}:6: malformed JSON") for line in lines)
    assert lines[-1].startswith(f"{data}: 6 rows, 4 unusable")
    clean = tmp_path / "clean.jsonl"
    clean.write_text(json.dumps(rows[0]) + "\n")
    ok = cli("data", "check", "demo/vqa", f"data.train={clean}", "data.eval=null")
    assert ok.returncode == 0 and ok.stdout.strip().endswith("1 rows, 0 unusable")


def test_training_with_a_bad_row_stops_before_the_first_step(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"image": "gone.png", "question": "Q?", "answer": "red"}) + "\n")
    done = cli("train", "demo/vqa", f"data.train={data}", "data.eval=null", f"output_dir={tmp_path / 'run'}")
    assert done.returncode == 2 and f"{data}:1: image not found" in done.stderr
    assert "data.on_error=skip" in done.stderr and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_kill_minus_9_then_resume_gives_the_uninterrupted_adapter(tmp_path):
    common = ["train", "demo/vqa", *RUN, "train.max_steps=30", "train.save_strategy=steps", "train.save_steps=10",
              "train.save_total_limit=3"]
    reference = cli(*common, f"output_dir={tmp_path / 'ref'}")
    assert reference.returncode == 0, reference.stderr[-2000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "finetune", *common, f"output_dir={out}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "checkpoint-10" / "trainer_state.json").is_file():
        assert proc.poll() is None and time.time() < deadline, "training ended before the first checkpoint"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "adapter_model.safetensors").exists()  # really killed before the end

    resumed = cli(*common, f"output_dir={out}", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 30
    # The resumed run keeps the first run's history (steps 1-10 from checkpoint-10) and logs 11-30 itself.
    assert [e["step"] for e in state["log_history"] if "loss" in e] == list(range(1, 31))
    a, b = load_file(tmp_path / "ref" / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_resume_skips_a_checkpoint_cut_short_by_a_kill(tmp_path):
    from finetune.config import load_recipe
    from finetune.training import resume_checkpoint, training_arguments

    good = tmp_path / "checkpoint-10"
    good.mkdir()
    (good / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-20").mkdir()  # the save was killed: no trainer_state.json yet
    args = training_arguments(load_recipe("demo/vqa", {"output_dir": str(tmp_path),
                                                       "train.resume_from_checkpoint": True}))
    assert resume_checkpoint(args) == str(good)
    assert (tmp_path / "checkpoint-20.incomplete").is_dir()
    empty = training_arguments(load_recipe("demo/vqa", {"output_dir": str(tmp_path / "none"),
                                                        "train.resume_from_checkpoint": True}))
    with pytest.raises(FinetuneError, match="no complete checkpoint"):
        resume_checkpoint(empty)


def test_a_non_finite_loss_stops_the_run_naming_the_step(tmp_path, monkeypatch):
    from transformers import LlavaForConditionalGeneration

    real = LlavaForConditionalGeneration.forward
    calls = []

    def poisoned(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3 and out.loss is not None:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(LlavaForConditionalGeneration, "forward", poisoned)
    from finetune.config import parse_overrides

    overrides = parse_overrides(RUN)
    overrides.update({"output_dir": str(tmp_path), "train.max_steps": 6, "train.save_strategy": "steps",
                      "train.save_steps": 2, "data.eval": None, "train.per_device_train_batch_size": 8})
    with pytest.raises(FinetuneError, match="non-finite loss .* at step 3.*last good checkpoint: .*checkpoint-2"):
        train("demo/vqa", overrides)
    assert (tmp_path / "checkpoint-2" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_a_hub_token_never_reaches_the_logs_or_the_run_folder(tmp_path):
    token = "hf_FAKEtoken1234567890abcdefSECRET"
    done = cli("train", "demo/vqa", *RUN, "train.max_steps=2", "train.save_strategy=steps", "train.save_steps=1",
               f"output_dir={tmp_path / 'run'}", env={"HF_TOKEN": token, "HUGGING_FACE_HUB_TOKEN": token})
    assert done.returncode == 0, done.stderr[-2000:]
    assert token not in done.stdout + done.stderr
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path
