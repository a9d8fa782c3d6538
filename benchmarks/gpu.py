"""QLoRA on a LLaVA-1.5-7B-shaped model on one GPU: `finetune train` against TRL's SFTTrainer, peak GPU memory and
tokens/s. Random weights, built here: nothing is downloaded.

    pip install -e ".[qlora,bench]"
    python benchmarks/gpu.py [--batch 1] [--steps 10] [--seq 1024] [--json] [--save FILE] [--only ours|trl]
                             [--work DIR]
    python benchmarks/gpu.py --batch 8                 # mixed-length rows: ours groups by length and packs, TRL pads
    python benchmarks/gpu.py --tiny --steps 1          # the same code path on the CPU, a tiny shape (tests use it)

The model is LlavaForConditionalGeneration with llava-hf/llava-1.5-7b-hf's sizes: a CLIP ViT-L/14 tower at
336 px (576 image tokens), the 2-layer GELU MLP projector, a Llama-2-7B decoder (4096 wide, 32 layers, 11008 MLP)
and a 32064-token vocabulary; these are transformers' LlavaConfig defaults, documented as that checkpoint
(transformers/models/llava/configuration_llava.py), plus the checkpoint's padded vocabulary. Its tokenizer is the
embedded tiny-llava's (a small BPE with a ChatML template): token ids are small, the shapes are the real ones.
It is created on the GPU in bf16 and written once (~14 GB of safetensors) to --work; a rerun reuses it.

Both sides then train on the same rows, --steps x --batch of them (one epoch, so both train on every row once and
on the same non-pad tokens per step), each one 336 px image and an answer: at batch 1 an answer longer than --seq
tokens, cut to --seq by both; at a larger batch answers of log-uniform length, 1 token to what fits in --seq (many
short answers and a few long descriptions, as in LLaVA's instruction mix). NF4 4-bit decoder with double
quantization (vision tower, projector and lm_head kept 16-bit on both sides), bf16, gradient checkpointing
(non-reentrant), LoRA r=16 / alpha 32 / dropout 0.05 on the same Linear layers, the same logging_steps. Each
runner reports torch.cuda.max_memory_allocated, its non-pad tokens per step and its tokens/s
(benchmarks/_measure.py: no per-step GPU sync); this parent adds whole-process time and peak RSS. The batch-1 run
is sized for about 4 minutes on one H100, checkpoint included.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("PYTHONUNBUFFERED", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

from _harness import machine, medians, run_child, stamp, table

VOCAB = 32064  # llava-hf/llava-1.5-7b-hf: Llama-2's 32000 padded to a multiple of 64
# LlavaConfig's defaults (ViT-L/14 tower; LlamaConfig's 7B decoder) with the checkpoint's context and norm epsilon.
LLAVA_7B = {"vision": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                       "num_attention_heads": 16, "projection_dim": 768},
            "text": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
                     "rms_norm_eps": 1e-5}}
TINY = {"vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                   "projection_dim": 32},
        "text": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                 "num_key_value_heads": 2, "max_position_embeddings": 4096}}
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
LEARNING_RATE = 2e-4
LOGGING_STEPS = 10  # the same for both sides, passed to each: every log reads the loss back from the GPU
SEED = 42
IMAGE_SIZE = 336  # CLIP ViT-L/14-336: 576 image tokens
IMAGE_TOKENS = (IMAGE_SIZE // 14) ** 2
TEMPLATE_TOKENS = 40  # more than the chat template and question add to a row, so a mixed-length row fits in --seq
CHECKPOINT_GB = 14  # bf16 weights of the 7B shape
UNEQUAL = "the sides trained on different non-pad tokens per step (ours / TRL {:.4f}x): their tokens/s do not compare"
ROWS = [
    ("peak_gpu_gib", "peak GPU memory (max_memory_allocated), GiB", "{:.2f}"),
    ("steady_tokens_per_s", "non-pad tokens/s (steps 2..N)", "{:.0f}"),
    ("tokens_per_s", "non-pad tokens/s (all steps)", "{:.0f}"),
    ("tokens_per_step", "non-pad tokens per step (must be 1.00x)", "{:,.1f}"),
    ("padding", "padding share of tokens", "{:.1%}"),
    ("train_s", "training, s", "{:.1f}"),
    ("first_step_s", "time to first step, s", "{:.1f}"),
    ("wall_s", "whole process, s", "{:.1f}"),
    ("peak_rss_mib", "peak RSS, MiB", "{:.0f}"),
    ("trainable_parameters", "trainable parameters", "{:,}"),
    ("linear4bit_layers", "4-bit Linear layers", "{:,}"),
]


def build_checkpoint(folder: Path, tiny: bool) -> None:
    """Write model/ (random weights + processor) under `folder`, once: a rerun reuses it."""
    done = folder / (".done-tiny" if tiny else ".done-7b")
    if done.is_file():
        stamp(f"reusing the checkpoint in {folder / 'model'}")
        return
    import torch
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from finetune.demo.tiny import CHAT_TEMPLATE, IMAGE_TOKEN, build_tokenizer

    shape = TINY if tiny else LLAVA_7B
    stamp("building the tokenizer and processor")
    tokenizer = build_tokenizer()
    tokenizer.model_max_length = 4096
    image_size, patch = IMAGE_SIZE, 14
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                              crop_size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer, patch_size=patch, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, image_token=IMAGE_TOKEN, chat_template=CHAT_TEMPLATE)
    vision = CLIPVisionConfig(**shape["vision"], image_size=image_size, patch_size=patch)
    text = LlamaConfig(**shape["text"], vocab_size=VOCAB, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         image_seq_length=(image_size // patch) ** 2)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    stamp(f"creating the model on {device} ({dtype})")
    torch.manual_seed(SEED)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    params = sum(p.numel() for p in model.parameters())
    stamp(f"{params / 1e6:,.1f}M parameters; writing them to {folder / 'model'}")
    model.save_pretrained(folder / "model", max_shard_size="5GB")
    processor.save_pretrained(folder / "model")
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    done.touch()


def write_rows(folder: Path, rows: int, seq: int, mixed: bool) -> tuple[Path, list[int]]:
    """`rows` rows of one 336 px image and an answer: longer than `seq` tokens (both sides cut it to `seq`), or,
    `mixed`, of log-uniform length from 1 token to what fits in `seq`. Returns the file and the answers' tokens."""
    from transformers import AutoTokenizer

    from finetune.demo import synthetic
    from finetune.demo.tiny import GENERIC_TEXT

    data = folder / "data"
    (data / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    words = " ".join(GENERIC_TEXT.split()).replace(".", "").split()
    tokenizer = AutoTokenizer.from_pretrained(folder / "model")
    # A word after a space is its own tokens (the BPE splits at spaces): an answer's length is the sum of its words'.
    cost = {w: len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) for w in set(words)}
    budget = seq - IMAGE_TOKENS - TEMPLATE_TOKENS
    lengths = []
    with open(data / "train.jsonl", "w") as out:
        for i, scene in enumerate(synthetic.make_scenes(rows, SEED)):
            synthetic.render(scene).resize((IMAGE_SIZE, IMAGE_SIZE)).save(data / "images" / f"{i:04d}.png")
            target = round(math.exp(rng.uniform(0, math.log(budget)))) if mixed else seq
            answer, length = [], 0
            while length < target:
                answer.append(rng.choice(words))
                length += cost[answer[-1]]
            lengths.append(length)
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]},
                        {"role": "assistant", "content": [{"type": "text", "text": " ".join(answer)}]}]
            out.write(json.dumps({"messages": messages, "images": [f"images/{i:04d}.png"]}) + "\n")
    return data / "train.jsonl", lengths


def preflight(args) -> None:
    """Clear one-line reasons to stop before minutes are spent."""
    import torch

    if args.batch > 1 and args.seq - IMAGE_TOKENS - TEMPLATE_TOKENS < 2:
        raise SystemExit(f"--seq {args.seq} leaves no room for a mixed-length answer after the {IMAGE_TOKENS} image "
                         f"tokens: use --seq {IMAGE_TOKENS + TEMPLATE_TOKENS + 64} or more")
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("no GPU visible to torch (torch.cuda.is_available() is False): run on a GPU machine, or "
                         "--tiny for the CPU check")
    if not args.tiny and importlib.util.find_spec("bitsandbytes") is None:
        raise SystemExit("bitsandbytes is not installed: pip install -e '.[qlora]'")
    if args.only != "ours" and importlib.util.find_spec("trl") is None:
        raise SystemExit("TRL is not installed: pip install -e '.[bench]' (or --only ours)")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free / 2**30
    if not args.tiny and not (work / ".done-7b").is_file() and free < CHECKPOINT_GB + 2:
        raise SystemExit(f"{work} has {free:.0f} GiB free; the checkpoint needs ~{CHECKPOINT_GB} GiB (--work DIR)")


def quantize(tiny: bool) -> bool:
    """4-bit where bitsandbytes runs: always on a GPU; on the CPU (--tiny) when its CPU kernels import."""
    if not tiny:
        return True
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means no 4-bit here
        stamp("bitsandbytes does not import here: the tiny run trains without 4-bit")
        return False
    return True


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny shape on the CPU: the same code path, in seconds")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=1,
                        help="rows per step; above 1 the rows are of mixed length (ours groups and packs, TRL pads)")
    parser.add_argument("--seq", type=int, default=1024,
                        help="tokens per row: batch-1 rows are cut to it, mixed-length rows are at most this long")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--only", choices=("ours", "trl"))
    parser.add_argument("--work", default=None, help="checkpoint, runs and logs (default: /tmp/finetune-gpu-bench)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    parser.add_argument("--save", metavar="FILE", help="also write the JSON figures to FILE")
    args = parser.parse_args(argv)
    args.work = args.work or ("/tmp/finetune-gpu-bench-tiny" if args.tiny else "/tmp/finetune-gpu-bench")
    # Libraries print warnings on stdout (DeepSpeed's logger when transformers saves the checkpoint): stdout is
    # kept for the table or the JSON.
    with contextlib.redirect_stdout(sys.stderr):
        summary = run(args)
    if args.save:
        Path(args.save).write_text(json.dumps(summary, indent=1))
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(report(summary))
    return summary


def run(args) -> dict:
    began = time.time()
    preflight(args)
    import torch

    from finetune.adapters import lora_targets
    from finetune.config import AdapterConfig, ModelConfig
    from finetune.models import modules_kept_unquantized

    work = Path(args.work)
    build_checkpoint(work, args.tiny)
    mixed = args.batch > 1
    model_dir = work / "model"
    data, answers = write_rows(work, rows=args.steps * args.batch, seq=args.seq, mixed=mixed)
    gpu = torch.cuda.is_available() and not args.tiny
    four_bit = quantize(args.tiny)

    from transformers import AutoConfig, AutoModelForImageTextToText

    with torch.device("meta"):
        skeleton = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(model_dir))
    targets = lora_targets(skeleton, AdapterConfig())
    skip = modules_kept_unquantized(str(model_dir), ModelConfig(name=str(model_dir)))
    recipe = {
        "task": "dialogue", "seed": SEED, "output_dir": str(work / "runs" / "ours"),
        "model": {"name": str(model_dir), "quantization": "4bit" if four_bit else "none",
                  "dtype": "bfloat16" if gpu else "float32"},
        "adapter": dict(LORA), "data": {"train": str(data), "max_length": args.seq},
        "train": {"max_steps": args.steps, "per_device_train_batch_size": args.batch, "learning_rate": LEARNING_RATE,
                  "gradient_checkpointing": True, "logging_steps": LOGGING_STEPS, "save_strategy": "no",
                  "report_to": "none"},
    }
    import yaml

    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    trl_config = {"model": str(model_dir), "data": str(data), "output_dir": str(work / "runs" / "trl"),
                  "max_length": args.seq, "steps": args.steps, "batch": args.batch, "learning_rate": LEARNING_RATE,
                  "logging_steps": LOGGING_STEPS, "seed": SEED, "lora": {**LORA, "targets": targets}, "bf16": gpu,
                  "gradient_checkpointing": True, "quantization": "4bit" if four_bit else None,
                  "skip_modules": skip}
    (work / "trl.json").write_text(json.dumps(trl_config, indent=1))
    commands = {"ours": [sys.executable, str(HERE / "_ours_runner.py"), str(work / "recipe.yaml")],
                "trl": [sys.executable, str(HERE / "_trl_runner.py"), str(work / "trl.json")]}
    sides = [args.only] if args.only else ["ours", "trl"]
    results = {side: [] for side in sides}
    for i in range(args.repeats):
        for side in sides if i % 2 == 0 else sides[::-1]:
            log = work / f"{side}-{i}.log"
            stamp(f"{side}: training {args.steps} steps x batch {args.batch} (log: {log})")
            figures = run_child(commands[side], work / f"{side}-{i}.json", log)
            if figures["steps"] != args.steps:
                raise SystemExit(f"{side} ran {figures['steps']} steps, not {args.steps}: see {log}")
            figures["peak_gpu_gib"] = figures["peak_gpu_bytes"] / 2**30 if figures.get("peak_gpu_bytes") else None
            results[side].append(figures)
            stamp(f"{side}: {figures['wall_s']:.1f} s whole process, {figures['train_s']:.1f} s training, "
                  f"{figures['tokens_per_step']:,.1f} non-pad tokens per step")
    median = medians(results, [key for key, *_ in ROWS])
    per_step = {side: median[side]["tokens_per_step"] for side in sides}
    if len(sides) == 2:
        per_step["ratio"] = per_step["ours"] / per_step["trl"]
        if abs(per_step["ratio"] - 1) > 1e-3:
            stamp(f"WARNING: {UNEQUAL.format(per_step['ratio'])}")
    return {"shape": "tiny" if args.tiny else "llava-1.5-7b", "steps": args.steps, "seq": args.seq,
            "batch": args.batch, "rows": "mixed" if mixed else "cut to seq",
            "answer_tokens": [min(answers), max(answers)], "logging_steps": LOGGING_STEPS,
            "quantization": "nf4" if four_bit else None, "machine": machine(), "runs": results, "median": median,
            "tokens_per_step": per_step, "total_s": time.time() - began}


def report(summary: dict) -> str:
    """The table under a heading that names the case, and what the table cannot show."""
    lo, hi = summary["answer_tokens"]
    case = (f"mixed-length batch {summary['batch']}: answers of {lo}-{hi} tokens after the image's {IMAGE_TOKENS}, "
            f"rows of at most {summary['seq']} (ours: its default length grouping and packing; TRL: padded)"
            if summary["rows"] == "mixed" else f"batch {summary['batch']} x {summary['seq']} tokens")
    lines = [f"### {case}", "", table(ROWS, summary["median"], summary["runs"]), "",
             (f"{summary['shape']} shape, {summary['steps']} steps, logging every {summary['logging_steps']}, "
              f"{'QLoRA (NF4)' if summary['quantization'] else 'LoRA'}; {summary['machine']['gpu'] or 'CPU'}; "
              f"{summary['total_s']:.0f} s in all")]
    for side, runs in summary["runs"].items():
        run = runs[0]
        lines.append(f"{side}: trainable parameters in {'/'.join(run.get('trainable_dtypes', []))}, activation "
                     f"checkpointing {'on' if run.get('activation_checkpointing') else 'off'}")
    ratio = summary["tokens_per_step"].get("ratio")
    if ratio is not None and abs(ratio - 1) > 1e-3:
        lines.append(f"WARNING: {UNEQUAL.format(ratio)}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
