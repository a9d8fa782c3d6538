"""The `finetune` command: parses arguments, calls the Python API, prints. One dict maps sub-commands."""

from __future__ import annotations

import argparse
import sys

from finetune.errors import FinetuneError


def cmd_train(args) -> None:
    from finetune.training import train

    overrides = list(args.overrides)
    if args.resume:
        overrides.append("train.resume_from_checkpoint=true")
    from finetune.parallelism import is_first_process

    out = train(args.recipe, overrides)
    if is_first_process():  # one line under torchrun / accelerate launch
        print(out)


def cmd_eval(args) -> None:
    from finetune.evaluation import evaluate

    evaluate(args.target, list(args.overrides))


def cmd_predict(args) -> None:
    from finetune.evaluation import predict

    labels = [label.strip() for label in args.labels.split(",") if label.strip()] if args.labels else None
    answer = predict(args.run, args.image, args.prompt, args.max_new_tokens, labels=labels)
    if labels is None:
        print(answer)
    else:
        width = max(len(label) for label, _ in answer)
        print("\n".join(f"{label:<{width}}  {probability:.4f}" for label, probability in answer))


def cmd_chat(args) -> None:
    from finetune.chat import chat

    chat(args.run, args.image, args.max_new_tokens)


def cmd_data(args) -> None:
    if args.data_command == "show":
        from finetune.data.show import show_data

        ok = show_data(args.recipe, list(args.overrides), rows=args.rows, as_json=args.json)
    else:
        from finetune.data.check import check_data

        ok = check_data(args.recipe, list(args.overrides))
    if not ok:
        raise SystemExit(1)


def cmd_push(args) -> None:
    from finetune.hub import push

    push(args.run, args.repo, private=args.private, revision=args.revision)  # prints the repo URL


def cmd_merge(args) -> None:
    from finetune.run import merge

    print(merge(args.run, args.out))


def cmd_report(args) -> None:
    from finetune.report import write_report

    print(write_report(args.run, args.examples))


def cmd_recipes(args) -> None:
    from finetune.config import RECIPES_DIR, parse_yaml, shipped_recipes

    for path in shipped_recipes():
        raw = parse_yaml(path.read_text()) or {}
        name = path.relative_to(RECIPES_DIR).with_suffix("").as_posix()
        print(f"{name:<20} {raw.get('description', '')}")


def cmd_configs(args) -> None:
    from finetune.launch_configs import config_path, description, shipped_configs

    if args.path:  # alone on its line, for `accelerate launch --config_file "$(finetune configs --path fsdp)"`
        print(config_path(args.path))
        return
    for name, path in shipped_configs().items():
        print(f"{name:<6} {description(path)}  {path}")


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict, "chat": cmd_chat, "data": cmd_data,
            "push": cmd_push, "merge": cmd_merge, "report": cmd_report, "recipes": cmd_recipes, "configs": cmd_configs}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune", description="Fine-tune vision-language models with LoRA / QLoRA.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="run a recipe: finetune train RECIPE [KEY=VALUE ...]")
    p.add_argument("recipe", help="recipe YAML path or shipped name (see `finetune recipes`)")
    p.add_argument("overrides", nargs="*", help="dotted recipe keys, e.g. data.train=my.jsonl train.max_steps=100")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    p = sub.add_parser("eval", help="task metrics on data.eval: finetune eval RUN_OR_RECIPE [KEY=VALUE ...]")
    p.add_argument("target", help="a run folder or Hub repo id (base + adapter), or a recipe (the base model alone)")
    p.add_argument("overrides", nargs="*", help="dotted recipe keys, e.g. data.eval=test.jsonl")
    for name, helptext in (("predict", "one answer for one image and prompt"),
                           ("chat", "an interactive multi-turn chat about an image")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("run", help="a run folder or Hub repo id (or a recipe, for the base model)")
        p.add_argument("--image", help="image file")
        if name == "predict":
            p.add_argument("--prompt", help="the question or instruction (generative runs)")
            p.add_argument("--labels", help="comma-separated class names to rank for the image (retrieval runs)")
        p.add_argument("--max-new-tokens", type=int, default=None)
    data = sub.add_parser("data", help="data tools: finetune data check|show RECIPE [KEY=VALUE ...]")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("check", help="read every row as training would; exit 1 if any is unusable")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p = data_sub.add_parser("show", help="the first examples of data.train as the model sees them, supervised "
                            "tokens marked; exit 1 if a row shown is unusable")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--rows", type=int, default=3, help="how many examples (default 3)")
    p.add_argument("--json", action="store_true", help="one JSON object per example: row, text, supervised, "
                   "tokens, image_tokens")
    p = sub.add_parser("push", help="upload adapter, processor, recipe, metrics and model card to the Hub")
    p.add_argument("run")
    p.add_argument("--repo", required=True, help="OWNER/NAME")
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision", help="branch to commit to (created if missing)")
    p = sub.add_parser("merge", help="write base + adapter merged into a plain 16-bit model folder")
    p.add_argument("run", help="a run folder or Hub repo id")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p = sub.add_parser("report", help="rebuild RUN/report.html (curves, metrics, example gallery) from the run folder")
    p.add_argument("run")
    p.add_argument("--examples", type=int, default=None,
                   help="gallery size (default: the recipe's eval.report_examples, 200)")
    sub.add_parser("recipes", help="list the shipped recipes")
    p = sub.add_parser("configs", help="list the shipped `accelerate launch --config_file` files (ddp, fsdp, zero2, "
                       "zero3)")
    p.add_argument("--path", metavar="NAME", help="print only that config's absolute path")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from finetune.startup import (
        skip_bitsandbytes,
        skip_bitsandbytes_unless_needed,
        skip_deepspeed_unless_needed,
    )

    target = getattr(args, "recipe", None) or getattr(args, "target", None) or getattr(args, "run", None)
    overrides = list(getattr(args, "overrides", None) or [])
    if args.command == "train":
        skip_deepspeed_unless_needed(target, overrides)
    else:  # only training runs DeepSpeed
        skip_deepspeed_unless_needed(None)
    if args.command == "data":  # the data tools load a processor, never weights
        skip_bitsandbytes()
    elif args.command in ("train", "eval", "predict", "chat", "merge"):
        skip_bitsandbytes_unless_needed(target, overrides)
    try:
        COMMANDS[args.command](args)
    except FinetuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; checkpoints already written stay in the run folder", file=sys.stderr)
        return 130
    return 0
