"""`finetune train` against TRL's SFTTrainer on one mixed-length multimodal fixture, as whole processes.

    pip install -e ".[bench]"      # TRL, for this benchmark only
    python benchmarks/vs_trl.py [--repeats 3] [--steps 20] [--batch 8] [--json] [--ours KEY=VALUE ...]

The fixture (benchmarks/_fixture.py, built once into --fixture): a ~4.3M-parameter LLaVA-shaped model with
random weights and 256 one-to-three-turn samples with one image each, answers of 1-80 words. Both sides train
the same model on the same data with the same LoRA (r=16, alpha=32, dropout 0.05, the same Linear layers), the
same optimizer settings, max_length and steps x batch; each runs as its own process (ours: the real
`finetune train` command line with a measuring callback, benchmarks/_ours_runner.py; TRL: SFTTrainer as its
docs set it up for VLMs, benchmarks/_trl_runner.py), alternated, --repeats times each.

Measured the same way for both (benchmarks/_measure.py): whole-process seconds and peak RSS by this parent
(wall clock around the child, the child's rusage from os.wait4); training seconds (on_train_begin to
on_train_end), time to first step (spawn to the end of step 1), non-pad tokens/s and padding share (per batch
stepped on: the examples' tokens against input_ids.numel(), by wrapping each trainer's collator).
Differences that remain: TRL's loss covers every token (its assistant_only_loss needs {% generation %} markers
that this chat template lacks), ours only the replies; `finetune train` also checks every row before the first
step and writes its run folder (report, model card), TRL saves the adapter; on a CPU our LoRA layers run
finetune.lora_dropout.CpuDropout (same p and statistics as TRL's nn.Dropout) and finetune.lora_forward (the same
values as peft's forward, with fewer passes over memory).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

from _fixture import MAX_LENGTH, build, parameter_count
from _harness import machine, medians, run_child, stamp, table

LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
LEARNING_RATE = 2e-4
LOGGING_STEPS = 10  # the same for both sides, passed to each
SEED = 42
ROWS = [  # (key, label, format)
    ("wall_s", "whole process, s", "{:.2f}"),
    ("train_s", "training, s", "{:.2f}"),
    ("first_step_s", "time to first step, s", "{:.2f}"),
    ("tokens_per_s", "non-pad tokens/s (training)", "{:.0f}"),
    ("tokens_per_step", "non-pad tokens per step", "{:.0f}"),
    ("padding", "padding share of tokens", "{:.1%}"),
    ("peak_rss_mib", "peak RSS, MiB", "{:.0f}"),
]


def lora_targets(model_dir: Path) -> list[str]:
    """The Linear layers `adapter.targets: auto` picks (projector + decoder), named for TRL's LoraConfig."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from finetune.adapters import lora_targets as ours
    from finetune.config import AdapterConfig

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(model_dir))
    return ours(model, AdapterConfig())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--fixture", default=os.path.join(tempfile.gettempdir(), "finetune-vs-trl-fixture"))
    parser.add_argument("--work", default=None, help="folder for run outputs and logs (default: a temporary one)")
    parser.add_argument("--ours", nargs="*", default=[], metavar="KEY=VALUE", help="extra `finetune train` overrides")
    parser.add_argument("--only", choices=("ours", "trl"), help="run one side only")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    args = parser.parse_args(argv)
    # Libraries print warnings on stdout (DeepSpeed's logger when transformers saves the fixture): stdout is kept
    # for the table or the JSON.
    with contextlib.redirect_stdout(sys.stderr):
        summary = run(args)
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        f = summary["fixture"]
        print(table(ROWS, summary["median"], summary["runs"]))
        print(f"\n{f['parameters']:,}-parameter LLaVA-shaped model, {f['samples']} samples, {f['steps']} steps x "
              f"batch {f['batch']}, LoRA r={f['lora_r']}, max_length {f['max_length']}; "
              f"{summary['machine']['cpus']} CPUs, load average at the end {summary['machine']['load_average']}")
    return summary


def run(args) -> dict:
    stamp(f"fixture in {args.fixture}")
    fixture = build(args.fixture)
    model_dir, data = fixture / "model", fixture / "data" / "train.jsonl"
    work = Path(args.work or tempfile.mkdtemp(prefix="vs-trl-"))
    work.mkdir(parents=True, exist_ok=True)
    recipe = {
        "task": "dialogue", "seed": SEED, "output_dir": str(work / "ours"),
        "model": {"name": str(model_dir)}, "adapter": dict(LORA),
        "data": {"train": str(data), "max_length": MAX_LENGTH},
        "train": {"max_steps": args.steps, "per_device_train_batch_size": args.batch, "learning_rate": LEARNING_RATE,
                  "logging_steps": LOGGING_STEPS, "save_strategy": "no", "report_to": "none"},
    }
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    trl_config = {"model": str(model_dir), "data": str(data), "output_dir": str(work / "trl"),
                  "max_length": MAX_LENGTH, "steps": args.steps, "batch": args.batch, "learning_rate": LEARNING_RATE,
                  "logging_steps": LOGGING_STEPS, "seed": SEED, "lora": {**LORA, "targets": lora_targets(model_dir)}}
    (work / "trl.json").write_text(json.dumps(trl_config, indent=1))
    commands = {
        "ours": [sys.executable, str(HERE / "_ours_runner.py"), str(work / "recipe.yaml"), *args.ours],
        "trl": [sys.executable, str(HERE / "_trl_runner.py"), str(work / "trl.json")],
    }
    sides = [args.only] if args.only else ["ours", "trl"]
    if "trl" in sides:
        try:
            import trl  # noqa: F401
        except ImportError:
            raise SystemExit("TRL is not installed: pip install -e '.[bench]' (or --only ours)") from None
    results = {side: [] for side in sides}
    for i in range(args.repeats):
        for side in sides if i % 2 == 0 else sides[::-1]:  # alternated, so drift in the machine's load is shared
            stamp(f"run {i + 1}/{args.repeats}: {side}")
            figures = run_child(commands[side], work / f"{side}-{i}.json", work / f"{side}-{i}.log")
            if figures["steps"] != args.steps:
                raise SystemExit(f"{side} ran {figures['steps']} steps, not {args.steps}: see {work / f'{side}-{i}.log'}")
            results[side].append(figures)
            stamp(f"{side}: {figures['wall_s']:.1f} s whole, {figures['train_s']:.1f} s training")
    return {
        "fixture": {"parameters": parameter_count(fixture), "samples": len(data.read_text().splitlines()),
                    "steps": args.steps, "batch": args.batch, "max_length": MAX_LENGTH, "lora_r": LORA["r"]},
        "machine": machine(), "ours_overrides": args.ours, "work": str(work),
        "runs": results,
        "median": medians(results, [key for key, *_ in ROWS] + ["steady_tokens_per_s"]),
    }


if __name__ == "__main__":
    main()
