"""The embedded tiny-clip checkpoint: loads like a Hub CLIP, real CLIP tokenizer, a weak but real retriever."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import (
    AutoModel,
    AutoProcessor,
    AutoTokenizer,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
)

from finetune.contrastive import dual_encoder_loss
from finetune.demo import synthetic, tiny_clip
from finetune.demo.cache import cache_dir


@pytest.fixture(scope="module")
def folder():
    return tiny_clip.tiny_clip_path()  # built once per $FINETUNE_CACHE (~40 s on 2 cores), then cached


@pytest.fixture(scope="module")
def model(folder):
    return AutoModel.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def processor(folder):
    return AutoProcessor.from_pretrained(folder)


@pytest.fixture(scope="module")
def tokenizer(folder):
    return AutoTokenizer.from_pretrained(folder)


def test_the_folder_is_cached_under_finetune_cache(folder):
    assert folder.is_relative_to(cache_dir()) and folder.name.startswith("tiny-clip-")
    assert tiny_clip.tiny_clip_path() == folder
    assert (folder / "model.safetensors").is_file()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".tiny-clip")]  # no temp folder left


def test_loads_with_the_auto_classes(model, processor, tokenizer):
    assert isinstance(model, CLIPModel) and isinstance(processor, CLIPProcessor)
    assert isinstance(tokenizer, CLIPTokenizer) and isinstance(processor.tokenizer, CLIPTokenizer)
    # The PIL image processor where torchvision is missing; with it, transformers picks its torchvision one.
    assert type(processor.image_processor).__name__ in ("CLIPImageProcessorPil", "CLIPImageProcessor")
    text = model.config.text_config
    assert text.vocab_size == len(tokenizer)
    assert text.eos_token_id == tokenizer.eos_token_id != 2  # 2 would select CLIP's legacy argmax pooling
    assert text.max_position_embeddings == tokenizer.model_max_length
    assert sum(p.numel() for p in model.parameters()) < 300_000
    assert 0 < model.logit_scale.exp().item() <= 100


def test_the_processor_loads_without_torchvision(folder):
    """The demo command installs torch without torchvision: the processor must load there (a child process in which
    importing torchvision fails)."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['torchvision'] = None\nfrom transformers import AutoProcessor\n"
            "print(type(AutoProcessor.from_pretrained(sys.argv[1]).image_processor).__name__)")
    done = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "CLIPImageProcessorPil"


def test_processor_batch_runs_through_the_model(model, processor):
    scenes = synthetic.make_scenes(2, seed=0)
    batch = processor(text=[s.caption() for s in scenes], images=[synthetic.render(s) for s in scenes],
                      padding=True, return_tensors="pt")  # fmt: skip
    assert batch["pixel_values"].shape == (2, 3, synthetic.IMAGE_SIZE, synthetic.IMAGE_SIZE)
    with torch.no_grad():
        out = model(**batch, return_loss=True)
    assert out.logits_per_image.shape == (2, 2) and math.isfinite(out.loss.item())


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=40))
def test_no_text_is_cut_short_by_an_unknown_token(tokenizer, text):
    """CLIP's unknown token is <|endoftext|>, where its text model stops reading: it must only ever end a text."""
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.eos_token_id not in ids[1:-1]


def test_caption_words_are_whole_tokens(tokenizer):
    for word in (*synthetic.COLORS, *synthetic.SHAPES, *synthetic.POSITIONS, *synthetic.COUNT_WORDS.values()):
        assert tokenizer.tokenize(word) == [word + "</w>"]
    assert tokenizer.decode(tokenizer("Two RED circles")["input_ids"], skip_special_tokens=True) == "two red circles"


def test_the_base_is_a_weak_but_real_retriever(model, processor):
    # Measured on the 100 held-out scenes: mean recall 0.195 (text R@10 0.46); shape zero-shot 0.82,
    # colour 0.16 (chance 1/6). An untrained model scores about chance (mean recall ~0.06).
    scores = tiny_clip.retrieval_scores(model, processor)
    assert 0.1 <= scores["mean_recall"] <= 0.4
    assert scores["text_retrieval_recall@10"] >= 0.3
    assert tiny_clip.zeroshot_scores(model, processor, "shape")["zeroshot_top1"] >= 0.65
    assert tiny_clip.zeroshot_scores(model, processor, "color")["zeroshot_top1"] <= 0.35
    torch.manual_seed(0)
    untrained = tiny_clip.build_model(processor.tokenizer).eval()
    assert tiny_clip.retrieval_scores(untrained, processor)["mean_recall"] <= 0.12


@pytest.mark.slow
def test_a_short_lora_clearly_improves_held_out_retrieval(folder, processor):
    """150 LoRA steps (r=16, every Linear of both towers) on the synthetic train captions; measured 0.19 -> 0.87."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = AutoModel.from_pretrained(folder)
    before = tiny_clip.retrieval_scores(base.eval(), processor)["mean_recall"]
    targets = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "visual_projection", "text_projection"]
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    scenes = synthetic.make_scenes(500, seed=synthetic.SPLIT_SEEDS["train"])
    data = processor(text=[s.caption() for s in scenes], images=[synthetic.render(s) for s in scenes],
                     padding=True, return_tensors="pt")  # fmt: skip
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-3, weight_decay=0.0)
    steps, gen = 150, torch.Generator().manual_seed(0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    for _ in range(steps):
        rows = torch.randint(len(scenes), (32,), generator=gen)
        dual_encoder_loss(model, {k: v[rows] for k, v in data.items()}).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    after = tiny_clip.retrieval_scores(model.eval(), processor)["mean_recall"]
    assert after >= before + 0.4, (before, after)


def test_the_build_is_deterministic(monkeypatch):
    assert tiny_clip.build_tokenizer().backend_tokenizer.to_str() == tiny_clip.build_tokenizer().backend_tokenizer.to_str()
    monkeypatch.setattr(tiny_clip, "TRAIN", {**tiny_clip.TRAIN, "pool": 32, "batch": 8, "vision_steps": 3, "steps": 4})
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        processor = tiny_clip.build_processor()
        model = tiny_clip.build_model(processor.tokenizer)
        tiny_clip.pretrain(model, processor, seed=0)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    torch.manual_seed(0)
    untouched = tiny_clip.build_model(processor.tokenizer).state_dict()
    assert not torch.equal(untouched["visual_projection.weight"], states[0]["visual_projection.weight"])
