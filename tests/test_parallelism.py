"""How a run is distributed, read from the arguments and from accelerate's environment; the dtype policy on each kind
of device (capabilities mocked); how 4-bit weights load under each kind of sharding. No process group is started."""

import json

import pytest
import torch

from finetune.config import ModelConfig
from finetune.errors import ConfigError
from finetune.parallelism import gather_in_order, my_share, parallelism, sharded
from finetune.precision import (
    choose_dtype,
    compute_dtype,
    inference_autocast,
    mixed_precision_arguments,
)

ACCELERATE_ENV = ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE", "ACCELERATE_DEEPSPEED_CONFIG_FILE",
                  "ACCELERATE_USE_FSDP", "WORLD_SIZE")


@pytest.fixture
def clean_env(monkeypatch):
    for name in ACCELERATE_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


class Args:
    def __init__(self, fsdp=None, deepspeed=None):
        self.fsdp, self.deepspeed = fsdp, deepspeed


@pytest.mark.parametrize(("env", "args", "kind"), [
    ({}, Args(), "single"),
    ({"WORLD_SIZE": "2"}, Args(), "ddp"),
    ({"WORLD_SIZE": "2"}, Args(fsdp=True), "fsdp"),
    ({"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true"}, Args(), "fsdp"),  # accelerate launch with an FSDP config
    ({"WORLD_SIZE": "2"}, Args(deepspeed={"zero_optimization": {"stage": 3}}), "deepspeed-zero3"),
    ({"WORLD_SIZE": "2"}, Args(deepspeed={"zero_optimization": {"stage": 2}}), "deepspeed-zero2"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, Args(), "deepspeed-zero3"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, Args(), "deepspeed-zero2"),
])
def test_parallelism_from_arguments_and_accelerate_environment(clean_env, env, args, kind):
    for name, value in env.items():
        clean_env.setenv(name, value)
    assert parallelism(args) == kind
    assert sharded(args) == (kind in ("fsdp", "deepspeed-zero3"))


def test_zero_stage_from_a_deepspeed_json_file(clean_env, tmp_path):
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    assert parallelism(Args(deepspeed=str(config))) == "deepspeed-zero3"
    clean_env.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    clean_env.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(config))  # accelerate's deepspeed_config_file
    assert parallelism(Args()) == "deepspeed-zero3"


@pytest.mark.parametrize(("device", "expected"), [
    ("ampere", torch.bfloat16), ("volta", torch.float16), ("mps", torch.float32), ("cpu", torch.float32)])
def test_dtype_policy_per_device(clean_env, device, expected):
    monkeypatch, emulated = clean_env, []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: device in ("ampere", "volta"))
    # A V100 answers True when emulation counts (the default): only native bf16 may choose bf16.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: emulated.append(including_emulation) or device == "ampere"
                        or including_emulation)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: device == "mps")
    assert choose_dtype("auto") == expected
    assert emulated in ([], [False])
    assert choose_dtype("bfloat16") == torch.bfloat16 and choose_dtype("float32") == torch.float32
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # accelerate launch with a bf16 config
    assert choose_dtype("auto") == torch.bfloat16 and choose_dtype("float32") == torch.float32


def test_mixed_precision_arguments_turn_on_autocast_and_loss_scaling():
    assert mixed_precision_arguments(torch.bfloat16, on_gpu=False) == {"bf16": True}
    assert mixed_precision_arguments(torch.float16, on_gpu=True) == {"fp16": True}  # Trainer adds the GradScaler
    assert mixed_precision_arguments(torch.float32) == {}
    with pytest.raises(ConfigError, match="float16 needs a GPU"):
        mixed_precision_arguments(torch.float16, on_gpu=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's answer to model.dtype=float16")
def test_fp16_on_the_cpu_stops_before_the_model_loads():
    from finetune.config import load_recipe
    from finetune.training import training_arguments

    with pytest.raises(ConfigError, match="float16 needs a GPU"):
        training_arguments(load_recipe("demo/vqa", {"model.dtype": "float16"}))


def test_inference_autocast_follows_the_frozen_weights():
    frozen = torch.nn.Linear(4, 4).to(torch.bfloat16)
    trained = torch.nn.Linear(4, 4)  # trained in full: fp32 (finetune.adapters)
    model = torch.nn.Sequential(frozen, trained)
    assert compute_dtype(model) == torch.bfloat16
    x = torch.randn(2, 4, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError):
        model(x)  # what evaluation did before: "expected m1 and m2 to have the same dtype"
    with inference_autocast(model):
        assert model(x).dtype == torch.bfloat16
    fp32 = torch.nn.Linear(4, 4)
    assert compute_dtype(fp32) == torch.float32
    with inference_autocast(fp32):
        assert not torch.is_autocast_enabled("cpu")  # fp32 results stay exactly what they were


@pytest.mark.parametrize(("kind", "device_map", "storage"), [
    ("single", True, torch.uint8), ("ddp", True, torch.uint8), ("fsdp", True, "compute"),
    ("deepspeed-zero2", True, torch.uint8), ("deepspeed-zero3", False, "compute")])
def test_four_bit_loading_per_parallelism(monkeypatch, random_tiny, kind, device_map, storage):
    """ZeRO-3 places the weights itself (transformers refuses a device_map there); FSDP and ZeRO-3 shard one dtype,
    so the 4-bit storage is the compute dtype."""
    pytest.importorskip("bitsandbytes")
    from finetune.models import from_pretrained_kwargs

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    cfg = ModelConfig(name=str(random_tiny), quantization="4bit")
    kwargs = from_pretrained_kwargs(cfg, str(random_tiny), distributed=kind)
    assert ("device_map" in kwargs) == device_map
    quant = kwargs["quantization_config"]
    assert quant.bnb_4bit_quant_storage == (torch.bfloat16 if storage == "compute" else storage)
    assert quant.bnb_4bit_compute_dtype == torch.bfloat16


def test_shares_on_one_process_are_the_whole():
    items = list(range(7))
    assert my_share(items) == items and gather_in_order(my_share(items)) == items
