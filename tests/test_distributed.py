"""Two CPU processes (torchrun, gloo) with DDP, FSDP2 and DeepSpeed ZeRO-2 / ZeRO-3, against one process.

The data alternates two rows with an image and two without, read in order with 2 rows per process: process 0 sees
only images and process 1 only text, the case that hangs sharded training when a process skips the vision tower
(ms-swift#4918, LLaMA-Factory#5648, DeepSpeed#7170). Each distributed run must train on exactly what one process
with a batch of 4 trains on: the same losses, gradient norms and weights.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.demo.synthetic import make_scenes, render

ROOT = Path(__file__).resolve().parents[1]
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
ZERO = {stage: {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": "auto",
                "train_batch_size": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                "bf16": {"enabled": "auto"}} for stage in (2, 3)}
# In file order, 2 rows a process: rows 0, 1, 4, 5 go to process 0 and rows 2, 3, 6, 7 to process 1.
SEQUENTIAL = ["train.train_sampling_strategy=sequential", "data.packing=false", "train.logging_steps=1",
              "data.eval=null"]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, random_tiny):
    folder = tmp_path_factory.mktemp("mixed")
    for i, scene in enumerate(make_scenes(4, seed=0)):
        render(scene).save(folder / f"{i}.png")
    rows = []
    for i in range(8):
        if (i // 2) % 2 == 0:
            rows.append({"image": f"{i % 4}.png", "conversations": [
                {"from": "human", "value": "<image>\nWhat is in the picture?"},
                {"from": "gpt", "value": f"Shapes, {i} of them."}]})
        else:
            rows.append({"conversations": [{"from": "human", "value": "Say a word."},
                                           {"from": "gpt", "value": f"Word number {i}."}]})
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for stage, config in ZERO.items():
        (folder / f"zero{stage}.json").write_text(json.dumps(config))
    return folder, random_tiny


def finetune_train(folder, model, out, *overrides, processes=1):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
                if processes > 1 else [sys.executable])
    cmd = [*launcher, "-m", "finetune", "train", "demo/vqa", f"model.name={model}",
           f"data.train={folder / 'data.jsonl'}", f"output_dir={out}", *SEQUENTIAL, *overrides]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    return done


def trained(done, out):
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    logs = [value for e in history if "loss" in e for value in (e["loss"], e["grad_norm"])]
    return logs, load_file(out / "adapter_model.safetensors")


def kind_arguments(kind, folder):
    return {"ddp": [], "fsdp": ["train.fsdp=true"],
            "zero2": [f"train.deepspeed={folder / 'zero2.json'}"],
            "zero3": [f"train.deepspeed={folder / 'zero3.json'}"]}[kind]


def needs(kind):
    if kind.startswith("zero") and not HAS_DEEPSPEED:
        pytest.skip("DeepSpeed is not installed (pip install -e '.[test]' installs it)")


# The projector trained in full by SGD: its start is the checkpoint's on every side, so weights compare directly
# (DeepSpeed's ZeRO-3 draws LoRA's random start in partitioned form, another draw than one process makes).
PROJECTOR_SGD = ["adapter.lora=false", "adapter.train_fully=[projector]", "train.optim=sgd", "train.learning_rate=0.5",
                 "train.lr_scheduler_type=constant", "train.warmup_steps=0", "train.max_steps=2"]


@pytest.fixture(scope="module")
def one_process(mixed, tmp_path_factory):
    folder, model = mixed
    out = tmp_path_factory.mktemp("one") / "run"
    return trained(finetune_train(folder, model, out, *PROJECTOR_SGD, "train.per_device_train_batch_size=4"), out)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ddp", "fsdp", "zero2", "zero3"])
def test_two_processes_with_one_text_only_train_what_one_process_trains(kind, mixed, one_process, tmp_path):
    needs(kind)
    folder, model = mixed
    out = tmp_path / kind
    done = finetune_train(folder, model, out, *PROJECTOR_SGD, "train.per_device_train_batch_size=2",
                          *kind_arguments(kind, folder), processes=2)
    logs, weights = trained(done, out)
    expected_logs, expected = one_process
    # float32 sums over the same 4 rows taken in another order: relative differences near 1e-7
    assert logs == pytest.approx(expected_logs, rel=1e-5)
    projector = [k for k in expected if "multi_modal_projector" in k]
    assert projector and all(k in weights for k in projector)
    for key in projector:
        torch.testing.assert_close(weights[key], expected[key], rtol=1e-5, atol=1e-6)
    info = json.loads((out / "run_info.json").read_text())
    assert info["world_size"] == 2
    assert info["parallelism"] == {"zero2": "deepspeed-zero2", "zero3": "deepspeed-zero3"}.get(kind, kind)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fsdp", "zero3"])
def test_qlora_shards_its_4_bit_weights(kind, mixed, tmp_path):
    """QLoRA under FSDP and ZeRO-3 (4-bit storage in the compute dtype, no device_map) with a text-only process."""
    pytest.importorskip("bitsandbytes")
    needs(kind)
    folder, model = mixed
    qlora = ["model.quantization=4bit", "train.max_steps=2", "adapter.dropout=0.0"]
    expected, _ = trained(finetune_train(folder, model, tmp_path / "one", *qlora, "train.per_device_train_batch_size=4"),
                          tmp_path / "one")
    logs, weights = trained(finetune_train(folder, model, tmp_path / kind, *qlora, "train.per_device_train_batch_size=2",
                                           *kind_arguments(kind, folder), processes=2), tmp_path / kind)
    assert logs == pytest.approx(expected, rel=1e-4)  # the same dequantized weights, sums in another order
    assert any("lora_B" in k and w.abs().sum() > 0 for k, w in weights.items())


@pytest.mark.slow
def test_fsdp_run_folder_evaluation_and_resume(mixed, tmp_path):
    """`train.fsdp=true` with a sharded state dict: a plain PEFT folder, before/after printed once with the metrics
    of one process, and a resumed run that ends where the uninterrupted one did."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from finetune import evaluate

    folder, model = mixed
    out = tmp_path / "fsdp"
    args = ["train.fsdp=true", 'train.fsdp_config={"state_dict_type": "SHARDED_STATE_DICT"}',
            "adapter.train_fully=[projector]", "train.per_device_train_batch_size=2", "train.num_train_epochs=2",
            "train.max_steps=4", "train.save_strategy=steps", "train.save_steps=1", "train.save_total_limit=null",
            f"data.eval={folder / 'data.jsonl'}", "eval.before_after=true", "eval.max_new_tokens=4"]
    done = finetune_train(folder, model, out, *args, processes=2)
    logs, weights = trained(done, out)
    assert len(logs) == 2 * 4  # loss and gradient norm of each step
    assert done.stdout.count("held-out") == 1 and done.stdout.count(str(out)) == 1  # printed once, by rank 0
    assert done.stderr.count("[finetune] training on") == 1
    info = json.loads((out / "run_info.json").read_text())
    assert (info["parallelism"], info["world_size"]) == ("fsdp", 2)
    peft = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(model), str(out))
    assert any("lora_" in n for n, _ in peft.named_parameters())
    # The after-training metrics, scored half by each process, equal one process scoring the saved run.
    shared = json.loads((out / "eval" / "metrics.json").read_text())
    alone = evaluate(out, {"data.eval": str(folder / "data.jsonl"), "eval.max_new_tokens": 4}, quiet=True)
    for key in ("vqa_accuracy", "answers_ended", "examples"):
        assert shared[key] == alone[key], key
    # Resume: drop the last two checkpoints and the final adapter, then continue from checkpoint-2.
    for name in ("checkpoint-3", "checkpoint-4"):
        subprocess.run(["rm", "-r", str(out / name)], check=True)
    (out / "adapter_model.safetensors").unlink()
    resumed = finetune_train(folder, model, out, *args[:-2], "eval.before_after=false", "--resume", processes=2)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    again = load_file(out / "adapter_model.safetensors")
    for key, value in weights.items():
        torch.testing.assert_close(again[key], value, rtol=0, atol=0)  # the same steps, in the same order


@pytest.mark.slow
def test_fsdp_on_one_process_is_one_line(mixed, tmp_path):
    folder, model = mixed
    done = finetune_train(folder, model, tmp_path / "run", "train.fsdp=true", "train.max_steps=1")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: FSDP was asked for")
    assert "Traceback" not in done.stderr


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("config", ["ddp", "fsdp", "zero2", "zero3"])
def test_shipped_accelerate_configs_launch_on_two_processes(config, mixed, tmp_path):
    """`accelerate launch --config_file $(finetune configs --path NAME)`, as the README says (bf16, from the file),
    with the before/after comparison (under ZeRO-3, whose base loads partitioned, a one-line refusal instead)."""
    from finetune.launch_configs import config_path

    needs(config)
    folder, model = mixed
    out = tmp_path / config
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_path(config)),
           "--num_processes", "2", "--main_process_port", str(free_port()), "-m", "finetune", "train", "demo/vqa",
           f"model.name={model}", f"data.train={folder / 'data.jsonl'}", f"output_dir={out}", *SEQUENTIAL,
           "train.max_steps=2", "train.per_device_train_batch_size=2", f"data.eval={folder / 'data.jsonl'}",
           "eval.before_after=true", "eval.max_new_tokens=4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if config == "zero3":
        refused = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
        assert refused.returncode != 0 and "error: eval.before_after under DeepSpeed ZeRO-3" in refused.stderr
        cmd.append("eval.before_after=false")
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    logs, _ = trained(done, out)
    assert done.stdout.count("held-out vqa_accuracy: before") == (config != "zero3")
    assert len(logs) == 4 and all(math.isfinite(value) for value in logs)  # two steps
    info = json.loads((out / "run_info.json").read_text())
    assert info["parallelism"] == {"zero2": "deepspeed-zero2", "zero3": "deepspeed-zero3"}.get(config, config)
