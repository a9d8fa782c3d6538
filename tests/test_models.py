"""Model loading, 4-bit placement, part discovery and LoRA targets on the embedded checkpoint."""

import pytest
import torch
from transformers import AutoModelForImageTextToText

from finetune.adapters import attach_adapters, fully_trained_modules, lora_targets
from finetune.config import AdapterConfig, ModelConfig
from finetune.data.collate import Collator
from finetune.data.encode import ChatEncoder
from finetune.data.formats import row_to_examples
from finetune.errors import FinetuneError
from finetune.models import load_model
from finetune.parts import find_parts

bnb = pytest.importorskip("bitsandbytes")


def four_bit_modules(model):
    return [name for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)]


def one_batch(processor, image):
    encoder = ChatEncoder(processor, max_length=256)
    example = row_to_examples({"image": "x.png", "question": "What colour?", "answer": "red"})[0]
    return Collator(processor.tokenizer.pad_token_id)([encoder.encode(example, images=[image])])


def decoder_linear_count(config) -> int:
    """Linear layers in a Llama decoder: 4 attention projections + 3 MLP projections per layer."""
    return config.text_config.num_hidden_layers * (4 + 3)


def test_parts_are_found_by_inspection(random_tiny):
    model = AutoModelForImageTextToText.from_pretrained(random_tiny)
    parts = find_parts(model)
    assert parts.decoder == "model.language_model"
    assert parts.projectors == ["model.multi_modal_projector"] and parts.lm_head == "lm_head"
    assert parts.vision == ["model.vision_tower"]


@pytest.mark.parametrize("family", ["Qwen2VLConfig", "Idefics3Config", "PaliGemmaConfig", "LlavaNextConfig"])
def test_parts_of_other_families(family):
    import transformers

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(getattr(transformers, family)())
    parts = find_parts(model)
    assert parts.projectors and parts.vision and parts.lm_head
    vision_linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                      and parts.part_of(n) == "vision"]
    assert vision_linears  # the vision tower is told apart from the decoder and the projector



def test_4bit_quantizes_only_the_language_decoder(random_tiny):
    model, _ = load_model(ModelConfig(name=str(random_tiny), quantization="4bit"))
    quantized = four_bit_modules(model)
    decoder_linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                       and n.startswith("model.language_model.")]
    assert quantized == decoder_linears and len(quantized) == decoder_linear_count(model.config)
    for name, module in model.named_modules():
        if name.startswith(("model.vision_tower", "model.multi_modal_projector", "lm_head")) and isinstance(
                module, torch.nn.Linear):
            assert not isinstance(module, bnb.nn.Linear4bit), name
    weight = model.model.language_model.layers[0].self_attn.q_proj.weight
    assert weight.quant_state.quant_type == "nf4" and weight.quant_state.state2 is not None  # double quant


def test_short_skip_names_would_quantize_the_vision_tower(random_tiny):
    """The transformers 5 pitfall our full dotted names avoid."""
    from transformers import BitsAndBytesConfig

    naive = BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=["vision_tower", "multi_modal_projector"])
    model = AutoModelForImageTextToText.from_pretrained(random_tiny, quantization_config=naive)
    assert any(".vision_tower." in name for name in four_bit_modules(model))


def test_gradient_checkpointing_sends_gradients_to_4bit_lora(random_tiny, processor, shapes_image, monkeypatch):
    calls = []
    from transformers import modeling_utils

    real = modeling_utils.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(modeling_utils, "checkpoint", counting_checkpoint)
    model, _ = load_model(ModelConfig(name=str(random_tiny), quantization="4bit"))
    model = attach_adapters(model, AdapterConfig(), gradient_checkpointing=True)
    model.activation_checkpointing_enable({"use_reentrant": True})
    model.train()
    model(**one_batch(processor, shapes_image)).loss.backward()
    assert calls, "gradient checkpointing did not run"
    lora_b = {n: p.grad for n, p in model.named_parameters() if "lora_B" in n}
    assert lora_b and all(g is not None and g.abs().sum() > 0 for g in lora_b.values())
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def test_default_lora_targets_projector_and_decoder(random_tiny):
    model = AutoModelForImageTextToText.from_pretrained(random_tiny)
    targets = lora_targets(model, AdapterConfig())
    assert {t.split(".")[1] for t in targets} == {"multi_modal_projector", "language_model"}
    projector = [n for n, m in model.model.multi_modal_projector.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(targets) == len(projector) + decoder_linear_count(model.config) and "lm_head" not in targets
    with_vision = lora_targets(model, AdapterConfig(vision_tower=True))
    assert any(".vision_tower." in t for t in with_vision)
    assert lora_targets(model, AdapterConfig(targets=[r"q_proj$"])) == [
        t for t in with_vision if t.endswith("q_proj")]


def test_training_only_the_projector_fully(random_tiny):
    model = AutoModelForImageTextToText.from_pretrained(random_tiny)
    cfg = AdapterConfig(lora=False, train_fully=["projector"])
    assert fully_trained_modules(model, cfg) == ["model.multi_modal_projector"]
    model.requires_grad_(False)
    peft_model = attach_adapters(model, cfg)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("multi_modal_projector" in n and "lora_" not in n for n in trainable)


def test_unknown_model_is_one_clear_line():
    with pytest.raises(FinetuneError, match="cannot load model 'no-such-org/no-such-model'.*Hub id"):
        load_model(ModelConfig(name="no-such-org/no-such-model"))
    with pytest.raises(FinetuneError, match="cannot load model"):
        load_model(ModelConfig(name="/tmp/definitely/not/here"))


def test_trainable_parameters_are_fp32_and_frozen_parts_keep_their_dtype(random_tiny):
    """bf16 (or fp16) updates to a fully trained projector would round away, and fp16 gradients could not be
    unscaled: what trains is fp32. What does not train keeps its 16-bit dtype, 4-bit decoder included."""
    model, _ = load_model(ModelConfig(name=str(random_tiny), quantization="4bit", dtype="bfloat16"))
    model = attach_adapters(model, AdapterConfig(train_fully=["projector"]))
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert any("multi_modal_projector" in n and "lora_" not in n for n in trainable)
    assert set(trainable.values()) == {torch.float32}
    frozen = {n: p.dtype for n, p in model.named_parameters() if not p.requires_grad}
    vision = [d for n, d in frozen.items() if ".vision_tower." in n]
    head = [d for n, d in frozen.items() if n.endswith("lm_head.weight")]
    assert vision and set(vision) == {torch.bfloat16} and head == [torch.bfloat16]  # not cast to fp32
    assert four_bit_modules(model)


@pytest.mark.slow
def test_small_updates_to_a_fully_trained_projector_survive_in_bf16(random_tiny, tmp_path):
    from safetensors.torch import load_file

    from finetune import train

    run = train("demo/vqa", {"model.name": str(random_tiny), "model.dtype": "bfloat16", "adapter.lora": False,
                             "adapter.train_fully": ["projector"], "data.train": "synthetic:vqa/train?n=4",
                             "data.eval": None, "train.max_steps": 2, "train.learning_rate": 1e-5,
                             "train.per_device_train_batch_size": 8, "train.save_strategy": "no",
                             "output_dir": str(tmp_path / "run")})
    trained = {k: v for k, v in load_file(run / "adapter_model.safetensors").items() if "multi_modal_projector" in k}
    base = AutoModelForImageTextToText.from_pretrained(random_tiny).model.multi_modal_projector.state_dict()
    assert trained
    for key, value in trained.items():
        original = base[key.split("multi_modal_projector.")[-1].replace("modules_to_save.default.", "")]
        # A 1e-5 step is below bf16's resolution for these weights: only fp32 parameters keep it.
        assert value.dtype == torch.float32 and not torch.equal(value, original.to(torch.bfloat16).float()), key


def test_inference_loads_on_the_gpu_when_there_is_one(random_tiny, monkeypatch, tmp_path):
    import finetune.models

    seen = []
    real = finetune.models.load_model
    monkeypatch.setattr(finetune.models, "load_model", lambda cfg, device=None, **kw: seen.append(device) or real(cfg))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    from finetune.evaluation import open_target

    open_target({"model": {"name": str(random_tiny), "dtype": "float32"}, "output_dir": str(tmp_path)})
    assert seen == ["cuda:1"]  # a run (Run.load) takes the same device: finetune.models.inference_device


def test_processor_options_from_the_recipe_reach_the_processor_and_the_run(random_tiny, tmp_path):
    from finetune.models import load_processor

    default = load_processor(ModelConfig(name=str(random_tiny)))
    changed = load_processor(ModelConfig(name=str(random_tiny), processor={"vision_feature_select_strategy": "full"}))
    assert default.vision_feature_select_strategy == "default" and changed.vision_feature_select_strategy == "full"
    changed.save_pretrained(tmp_path)  # what a run folder keeps, so evaluation sees what training saw
    from transformers import AutoProcessor

    assert AutoProcessor.from_pretrained(tmp_path).vision_feature_select_strategy == "full"


def test_sharded_training_reports_eval_loss_only_and_refuses_a_generated_metric(monkeypatch):
    from finetune.config import load_recipe
    from finetune.errors import ConfigError
    from finetune.training import _task_metric_impossible, sharded, training_arguments

    args = training_arguments(load_recipe("demo/vqa", {"train.eval_strategy": "steps"}))
    assert not sharded(args) and not _task_metric_impossible(args)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert sharded(args) and _task_metric_impossible(args)
    best = training_arguments(load_recipe("demo/vqa", {"train.eval_strategy": "steps", "train.save_strategy": "steps",
                                                       "train.metric_for_best_model": "vqa_accuracy"}))
    with pytest.raises(ConfigError, match="needs generation"):
        _task_metric_impossible(best)
