"""End to end on the embedded default: a recipe in, a loadable adapter out (CPU, few steps)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoProcessor

from finetune import train
from finetune.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"data.train": "synthetic:vqa/train?n=16", "data.eval": None, "train.logging_steps": 1,
         "train.per_device_train_batch_size": 8, "train.save_strategy": "no", "train.report_to": "none"}


def run_cli(*args, env=None, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "finetune", *args], check=False, capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=600)


@pytest.mark.slow
def test_demo_recipe_gives_a_complete_run_folder(tmp_path):
    run = train("demo/vqa", {**SMALL, "output_dir": str(tmp_path / "run"), "train.max_steps": 12,
                             "train.dataloader_num_workers": 2})  # worker processes encode the batches
    for name in ("adapter_config.json", "adapter_model.safetensors", "recipe.yaml", "trainer_state.json",
                 "processor_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (run / name).is_file(), name
    assert AutoProcessor.from_pretrained(run).tokenizer.convert_tokens_to_ids("<image>") is not None
    weights = load_file(run / "adapter_model.safetensors")
    assert weights and all("lora_" in key for key in weights)
    # B starts at zero: non-zero B matrices show the adapters were trained.
    assert all(w.abs().sum() > 0 for k, w in weights.items() if "lora_B" in k)
    losses = [e["loss"] for e in json.loads((run / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert losses[-1] < losses[0]
    from finetune.config import load_recipe

    assert load_recipe(run / "recipe.yaml").train["max_steps"] == 12


@pytest.mark.slow
def test_base_weights_stay_frozen_and_peft_loads_the_run(tmp_path, tiny_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    run = train("demo/vqa", {**SMALL, "output_dir": str(tmp_path / "run"), "train.max_steps": 4})
    base = AutoModelForImageTextToText.from_pretrained(tiny_path)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = PeftModel.from_pretrained(base, run)
    after = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
             for k, v in model.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_qlora_trains_on_cpu_with_gradient_checkpointing(tmp_path):
    pytest.importorskip("bitsandbytes")
    run = train("demo/vqa", {**SMALL, "output_dir": str(tmp_path / "run"), "train.max_steps": 3,
                             "model.quantization": "4bit", "train.gradient_checkpointing": True})
    weights = load_file(run / "adapter_model.safetensors")
    assert all(w.abs().sum() > 0 for k, w in weights.items() if "lora_B" in k)


@pytest.mark.slow
def test_staged_training_projector_then_lora(tmp_path):
    stage1 = train("demo/vqa", {**SMALL, "output_dir": str(tmp_path / "s1"), "train.max_steps": 3,
                                "adapter.lora": False, "adapter.train_fully": ["projector"]})
    weights = load_file(stage1 / "adapter_model.safetensors")
    assert any("multi_modal_projector" in k and "lora_" not in k for k in weights)
    stage2 = train("demo/vqa", {**SMALL, "output_dir": str(tmp_path / "s2"), "train.max_steps": 3,
                                "model.adapter": str(stage1)})
    assert (stage2 / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_group_by_length_uses_measured_lengths(tmp_path, monkeypatch):
    from finetune.data import encode
    from finetune.data.dataset import SupervisedDataset

    calls, decoded = [], []
    real = SupervisedDataset.__getitem__
    monkeypatch.setattr(SupervisedDataset, "__getitem__", lambda self, i: calls.append(i) or real(self, i))
    real_open = encode.open_image
    monkeypatch.setattr(encode, "open_image", lambda *a: decoded.append(a[0]) or real_open(*a))
    train("demo/vqa", {**SMALL, "output_dir": str(tmp_path / "run"), "train.max_steps": 2, "data.cache": False,
                       "train.group_by_length": True, "train.dataloader_num_workers": 0, "data.num_proc": 1})
    # Only the batches trained on (plus the one accelerate prefetches) were encoded, not all 64 examples again.
    assert len(calls) <= 3 * 8
    # The up-front check reads image headers only; each fetched example decodes its one image once.
    assert len(decoded) == len(calls)


def test_eval_strategy_without_eval_data_fails_at_start(tmp_path):
    with pytest.raises(ConfigError, match="data.eval is not"):
        train("demo/vqa", {**SMALL, "output_dir": str(tmp_path), "train.eval_strategy": "steps"})


@pytest.mark.slow
def test_cli_and_python_m_entry_points(tmp_path):
    listing = run_cli("recipes")
    assert listing.returncode == 0 and "demo/vqa" in listing.stdout and "captioning" in listing.stdout
    done = run_cli("train", "demo/vqa", f"output_dir={tmp_path / 'run'}", "data.train=synthetic:vqa/train?n=8",
                   "data.eval=null", "train.max_steps=1", "train.save_strategy=no")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("args, message", [
    (["train", "demo/vqa", "data.trian=x.jsonl"], "unknown recipe key 'data.trian'; did you mean data.train"),
    (["train", "demo/vqa", "data.train=/no/such/file.jsonl"], "data file not found: /no/such/file.jsonl"),
    (["train", "demo/vqa", "adapter.r=big"], "adapter.r must be int"),
    (["train", "demo/vqa", "model.name=no-such-org/no-such-model"], "cannot load model 'no-such-org/no-such-model'"),
    (["train", "no/such/recipe.yaml"], "recipe not found"),
])
def test_cli_mistakes_are_one_line(args, message):
    done = run_cli(*args, env={"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: ")
    assert message in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_torchrun_two_cpu_processes_shard_the_data(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "finetune", "train",
           "recipes/demo/vqa.yaml", f"output_dir={out}", "data.train=synthetic:vqa/train?n=16", "data.eval=null",
           "train.num_train_epochs=1", "train.per_device_train_batch_size=8", "train.save_strategy=no"]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((out / "trainer_state.json").read_text())
    # 64 examples, 8 per process: one epoch is 4 steps on two ranks (8 on one), so each rank read its shard.
    assert state["global_step"] == 4
    assert (out / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_eval_during_training_reports_the_task_metric_and_keeps_the_best(tmp_path):
    run = train("demo/vqa", {**SMALL, "output_dir": str(tmp_path / "run"), "data.eval": "synthetic:vqa/eval?n=4",
                             "train.max_steps": 4, "train.eval_strategy": "steps", "train.eval_steps": 2,
                             "train.save_strategy": "steps", "train.save_steps": 2,
                             "train.metric_for_best_model": "vqa_accuracy", "train.load_best_model_at_end": True,
                             "eval.before_after": False})
    state = json.loads((run / "trainer_state.json").read_text())
    scores = {e["step"]: e["eval_vqa_accuracy"] for e in state["log_history"] if "eval_vqa_accuracy" in e}
    assert sorted(scores) == [2, 4]
    best_step = max(scores, key=lambda s: (scores[s], -s))
    assert state["best_model_checkpoint"].endswith(f"checkpoint-{best_step}")
    assert (run / "eval-step-2" / "predictions.jsonl").is_file()


@pytest.mark.parametrize("items", [None, 7])
def test_logits_only_where_supervised_give_the_models_own_loss_and_gradients(random_tiny, processor, shapes_image,
                                                                              items):
    """The lm_head runs on the supervised positions only; loss and gradients equal the model's full-logits loss,
    as a mean and as a sum over an accumulated batch's token count."""
    from transformers import AutoModelForImageTextToText

    from finetune.adapters import attach_adapters
    from finetune.config import AdapterConfig
    from finetune.data.collate import Collator
    from finetune.data.encode import ChatEncoder
    from finetune.data.formats import row_to_examples
    from finetune.training import SupervisedLogitsLoss, keeps_logits

    encoder = ChatEncoder(processor, max_length=512)
    rows = [{"image": "x.png", "question": "What colour?", "answer": "red"},
            {"conversations": [{"from": "human", "value": "Hi, how many shapes?"}, {"from": "gpt", "value": "Three."},
                               {"from": "human", "value": "And?"}, {"from": "gpt", "value": "Nothing more."}]}]
    features = [encoder.encode(row_to_examples(r)[0], images=[shapes_image] if "image" in r else None) for r in rows]
    batch = Collator(encoder.pad_token_id)(features)
    torch.manual_seed(0)
    model = attach_adapters(AutoModelForImageTextToText.from_pretrained(random_tiny), AdapterConfig(dropout=0.0))
    assert keeps_logits(model)
    loss_fn = SupervisedLogitsLoss()
    labels = batch.pop("labels")
    keep = loss_fn.positions(labels)
    assert 0 < len(keep) < labels.shape[1] - 1  # prompt, image and padding positions are skipped
    ours = loss_fn(model(**batch, logits_to_keep=keep), labels, num_items_in_batch=items)
    ours.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    extra = {} if items is None else {"num_items_in_batch": items}
    theirs = model(**batch, labels=labels, **extra).loss
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-7)
