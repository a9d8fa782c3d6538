"""train(recipe): model + adapters + data -> transformers.Trainer -> a run folder with the adapter.

setup (recipe, model, adapters, data) -> train -> save. Trainer runs on Accelerate, so the same code
runs on a CPU, one GPU, or many through `torchrun` / `accelerate launch` (DDP, FSDP, DeepSpeed).
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.utils.data import RandomSampler, SequentialSampler
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from finetune.adapters import attach_adapters
from finetune.config import Recipe, load_recipe, parse_overrides, save_recipe
from finetune.contrastive import clamp_logit_scale, dual_encoder_loss
from finetune.data.collate import Collator
from finetune.data.dataset import build_dataset
from finetune.data.encode import IGNORE, make_encoder
from finetune.data.packing import packing_layout
from finetune.data.pairs import PairCollator, build_pairs
from finetune.data.sampler import LengthGroupedSampler
from finetune.errors import ConfigError, FinetuneError
from finetune.evaluation import EvalItem, eval_items, score, write_results
from finetune.models import load_model
from finetune.parallelism import (
    check_parallelism_request,
    gathered_adapter_weights,
    is_first_process,
    load_adapter_weights_sharded,
    parallelism,
    require_requested_parallelism,
    sharded,
    start_deepspeed_on_cpu,
    use_fsdp_on_cpu,
)
from finetune.precision import (
    choose_dtype,
    compute_dtype,
    mixed_precision_arguments,
    skip_adapter_input_casts,
)
from finetune.report import refresh_report
from finetune.run import Run, bundle_earlier_runs, fold_earlier_runs, save_scalars
from finetune.run_info import write_run_info
from finetune.tasks import TASKS
from finetune.vision_placeholder import VisionPlaceholder

log = logging.getLogger("finetune")

# Sensible defaults under the recipe's `train:` section (the recipe always wins).
TRAIN_DEFAULTS = {
    "per_device_train_batch_size": 8,
    "learning_rate": 2e-4,
    "num_train_epochs": 1,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.03,
    "logging_steps": 10,
    "save_strategy": "epoch",
    "save_total_limit": 2,
    "report_to": "none",
    "dataloader_num_workers": 0,
    # Keep a non-finite loss in the logs (the filter hides it, and checks it on the host every step):
    # StopOnNonFiniteLoss reads the logged value instead.
    "logging_nan_inf_filter": False,
    # Batches of similar length (lengths measured by the data check, finetune.data.sampler): little padding.
    "group_by_length": True,
}


def train(recipe: str | Path | dict | Recipe, overrides: list[str] | dict | None = None,
          callbacks: list[TrainerCallback] | None = None, **kw_overrides) -> Path:
    """Run a recipe; returns the run folder. Overrides: `["data.train=x.jsonl"]` or `**{"data.train": ...}`
    (keyword names may use `__` for dots: `train(r, data__train="x.jsonl")`). `callbacks` are added to the
    transformers Trainer."""
    setup_logging()
    started = datetime.now(timezone.utc)
    merged = dict(_as_dict(overrides))
    merged.update({key.replace("__", "."): value for key, value in kw_overrides.items()})
    recipe = load_recipe(recipe, merged)
    if not recipe.data.train:
        raise ConfigError("data.train is not set: give a data file, e.g. data.train=my.jsonl")
    args = training_arguments(recipe)
    check_parallelism_request(args)
    asked = parallelism(args)
    compare = bool(recipe.eval.before_after and recipe.data.eval)
    if compare and asked == "deepspeed-zero3":
        raise ConfigError("eval.before_after under DeepSpeed ZeRO-3: the base loads already partitioned, so it cannot "
                          "generate before training; set eval.before_after=false, then `finetune eval RECIPE` and "
                          "`finetune eval RUN`")

    set_seed(args.seed)  # LoRA's initial weights too, so two runs of one recipe are the same run
    start_deepspeed_on_cpu(args)
    contrastive = TASKS[recipe.task].kind == "contrastive"
    model, processor = load_model(recipe.model, distributed=asked, dual_encoder=contrastive)
    model = fold_earlier_runs(model, recipe)  # staged training: earlier stages merged into the base
    model = attach_adapters(model, recipe.adapter, gradient_checkpointing=bool(args.activation_checkpointing))
    train_set, eval_set, collator = datasets(recipe, processor, model, progress=args.process_index == 0)
    log.info("training on %d examples%s", len(train_set), f", evaluating on {len(eval_set)}" if eval_set else "")
    during = args.eval_strategy != "no" and not _task_metric_impossible(args)
    items = eval_items(recipe) if compare or during else None  # read once, scored as often as asked

    extra = [ClampLogitScale()] if contrastive else []
    # Text-only batches still run the vision tower (finetune.vision_placeholder): processes stay in lockstep, and a
    # batch whose only trained part is the projector still has a loss to back-propagate.
    placeholder = (None if contrastive else
                   VisionPlaceholder.for_model(model, make_encoder(processor, recipe.data.max_length)))
    trainer = (ContrastiveTrainer if contrastive else FinetuneTrainer)(
        model=model, args=args, train_dataset=train_set, eval_dataset=eval_set, data_collator=collator,
        processing_class=processor, callbacks=[StopOnNonFiniteLoss(), *extra, *(callbacks or [])], recipe=recipe,
        eval_items=items, vision_placeholder=placeholder,
    )
    distributed = require_requested_parallelism(trainer)
    out = Path(args.output_dir)
    main = trainer.is_world_process_zero()
    # Every process scores its share of the held-out items (finetune.parallelism.my_share); the first one writes.
    before = _score(recipe, model, processor, items, out / "eval-before", write=main) if compare else None

    trainer.train(resume_from_checkpoint=resume_checkpoint(args))

    trainer.save_model(str(out))  # adapter_config.json + adapter_model.safetensors (+ processor files)
    if main:
        processor.save_pretrained(str(out))
        if contrastive:
            save_scalars(trainer.model, out)
        save_recipe(recipe, out / "recipe.yaml")
        bundle_earlier_runs(recipe, out)
        trainer.save_state()
        write_run_info(out, trainer.model, started, time.time() - started.timestamp(), args.world_size,
                       parallelism=distributed)
    trainer.accelerator.wait_for_everyone()
    if compare:
        trained = _whole(trainer.model, out, distributed)
        after = _score(recipe, trained, processor, items, out / "eval", write=main)
    if main:
        if compare:
            headline = TASKS[recipe.task].headline_in(after)
            print(f"held-out {headline}: before {before[headline]:.4f} -> after {after[headline]:.4f} "
                  f"({after['examples']} examples of {recipe.data.eval})")
        from finetune.card import write_model_card

        write_model_card(out)  # after the eval above, so the card carries its metrics
        refresh_report(out, recipe.eval.report_examples)
        log.info("run folder: %s (open report.html to see the run)", out)
    return out


def datasets(recipe: Recipe, processor, model, progress: bool = True):
    """(train set, eval set or None, collator): chat examples checked and encoded by the model's processor (packed
    several to a row where the model allows it), or for a contrastive task image-text pairs."""
    data, eval_split = recipe.data, recipe.data.eval_split or "validation"
    if TASKS[recipe.task].kind == "contrastive":
        train_set, _ = build_pairs(data.train, data, data.split, progress)
        eval_set = build_pairs(data.eval, data, eval_split, progress)[0] if data.eval else None
        return train_set, eval_set, PairCollator(processor)
    encoder = make_encoder(processor, data.max_length, dtype=compute_dtype(model))
    train_set, _ = build_dataset(data.train, data, encoder, data.split, progress=progress)
    eval_set = build_dataset(data.eval, data, encoder, eval_split, progress=progress)[0] if data.eval else None
    return train_set, eval_set, Collator(encoder.pad_token_id, packing_layout(data.packing, model))


def _whole(model, run: Path, distributed: str):
    """The model to generate with after training: under FSDP each process holds a shard of every weight, so the
    saved run is loaded whole on this process."""
    return Run.open(run).load()[0] if distributed == "fsdp" else model


def _score(recipe: Recipe, model, processor, items: list[EvalItem], out: Path, write: bool = True) -> dict:
    model.eval()
    metrics, predictions = score(model, processor, items, TASKS[recipe.task], recipe.eval.max_new_tokens,
                                 recipe.eval.batch_size, recipe.data.max_length, templates=recipe.data.templates)
    metrics["dataset"] = recipe.data.eval
    model.train()
    if write:
        write_results(out, metrics, predictions)
    return metrics


def _task_metric_impossible(args: TrainingArguments) -> bool:
    """Generation needs whole weights: under sharding, evaluation during training reports the eval loss only."""
    if not sharded(args):
        return False
    if args.metric_for_best_model and args.metric_for_best_model.removeprefix("eval_") != "loss":
        raise ConfigError(f"train.metric_for_best_model={args.metric_for_best_model} needs generation, which a "
                          "sharded (FSDP / ZeRO-3) model cannot do during training: use eval_loss, then "
                          "`finetune eval RUN` on the saved run")
    log.warning("FSDP / ZeRO-3: evaluation during training reports the eval loss only; run `finetune eval` after")
    return True


def training_arguments(recipe: Recipe) -> TrainingArguments:
    values = {**TRAIN_DEFAULTS, **recipe.train}
    # group_by_length: the transformers 4 name users know; an explicit train_sampling_strategy wins over the default
    if values.pop("group_by_length") and "train_sampling_strategy" not in recipe.train:
        values["train_sampling_strategy"] = "group_by_length"
    values.setdefault("seed", recipe.seed)
    values.setdefault("dataloader_pin_memory", torch.cuda.is_available())
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        # Accelerate only sets up multi-process CPU training (DDP over gloo) when told it is on the CPU.
        values.setdefault("use_cpu", True)
    values["remove_unused_columns"] = False  # our dataset yields model inputs, not raw columns
    for old, new in (("gradient_checkpointing", "activation_checkpointing"),
                     ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
        if old in values:  # transformers 5 renamed these; accept the names every tutorial uses
            values.setdefault(new, values.pop(old))
    if values.get("activation_checkpointing"):
        values.setdefault("activation_checkpointing_kwargs", {"use_reentrant": False})
    if "bf16" not in values and "fp16" not in values:
        values.update(mixed_precision_arguments(choose_dtype(recipe.model.dtype)))
    if values.get("bf16") and not torch.cuda.is_available() and not torch.backends.mps.is_available():
        values.setdefault("use_cpu", True)  # bf16 autocast on the CPU: Trainer wants to be told
    if values.get("eval_strategy", "no") != "no" and not recipe.data.eval:
        raise ConfigError("train.eval_strategy is set but data.eval is not: give held-out data with data.eval=...")
    try:
        return TrainingArguments(output_dir=recipe.output_dir, **values)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"train: {str(err).strip().splitlines()[0]}") from None


def resume_checkpoint(args: TrainingArguments) -> str | None:
    """The checkpoint to resume from: `true` means the newest *complete* one in output_dir.

    Trainer writes trainer_state.json last, so a checkpoint without it was cut short (a kill during the
    save); it is renamed aside so neither we nor Trainer's rotation mistake it for the newest.
    """
    wanted = args.resume_from_checkpoint
    if wanted in (None, False, "false", "False", ""):
        return None
    if wanted not in (True, "true", "True"):
        if not (Path(wanted) / "trainer_state.json").is_file():
            raise FinetuneError(f"train.resume_from_checkpoint: {wanted} is not a complete checkpoint")
        return str(wanted)
    out = Path(args.output_dir)
    for folder in out.glob("checkpoint-*") if args.process_index == 0 else []:
        if folder.name.removeprefix("checkpoint-").isdigit() and not (folder / "trainer_state.json").is_file():
            log.warning("%s was not finished (killed during the save); moving it aside", folder)
            folder.rename(folder.with_name(folder.name + ".incomplete"))
    newest = _newest_checkpoint(out)
    if newest is None:
        raise FinetuneError(f"--resume: no complete checkpoint in {out} (set train.save_steps to write some)")
    return newest


class SupervisedLogitsLoss:
    """The causal-LM loss with logits computed only at the positions whose next token is supervised (in any row of
    the batch), through the models' `logits_to_keep`: the lm_head, and the batch x length x vocabulary logits that
    are a VLM step's largest activation, skip the prompt, image and padding positions. Equal to the model's own loss
    (transformers' ForCausalLMLoss: fp32 logits, a sum over the accumulated batch's tokens or a mean)."""

    def __init__(self):
        self.kept: torch.Tensor | None = None

    def positions(self, labels: torch.Tensor, known: torch.Tensor | None = None) -> torch.Tensor:
        """The positions to keep: `known` when the collator found them already (SupervisedPositions)."""
        self.kept = known if known is not None else supervised_positions(labels)
        return self.kept

    def __call__(self, outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        logits = outputs.logits.float()
        targets = labels[:, 1:][:, self.kept].to(logits.device)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                 ignore_index=IGNORE,
                                                 reduction="mean" if num_items_in_batch is None else "sum")
        return loss if num_items_in_batch is None else loss / num_items_in_batch


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    return (labels[:, 1:] != IGNORE).any(dim=0).nonzero().squeeze(-1)


class SupervisedPositions:
    """A collator that also gives SupervisedLogitsLoss its positions, found on the CPU in the data loader: found on
    a GPU (`nonzero`), they would make the host wait for the device at every step."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features: list[dict]) -> dict:
        batch = self.collator(features)
        batch[POSITIONS] = supervised_positions(batch["labels"])
        return batch


POSITIONS = "supervised_positions"


def keeps_logits(model) -> bool:
    """Whether the model's forward can compute logits at chosen positions only (transformers 5 VLMs can)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


class FinetuneTrainer(Trainer):
    """Trainer whose evaluation adds the task metric, whose loss computes logits only where they are supervised,
    and whose length-grouped sampler uses the lengths measured while checking the data (instead of encoding, and
    decoding every image of, the dataset again)."""

    def __init__(self, *args, recipe: Recipe, eval_items: list[EvalItem] | None = None,
                 vision_placeholder: VisionPlaceholder | None = None, **kwargs):
        if recipe is not None and TASKS[recipe.task].kind == "generative" and keeps_logits(kwargs["model"]):
            kwargs.setdefault("compute_loss_func", SupervisedLogitsLoss())
            if kwargs.get("data_collator") is not None:
                kwargs["data_collator"] = SupervisedPositions(kwargs["data_collator"])
        super().__init__(*args, **kwargs)
        if self.args.bf16 or self.args.fp16:
            skip_adapter_input_casts(self.model)  # every forward here runs under autocast
        self.recipe = recipe
        self.eval_items = eval_items
        self.vision_placeholder = vision_placeholder

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if not self.is_fsdp_enabled:
            use_fsdp_on_cpu(self)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Under FSDP, the adapter is gathered from every rank and saved as a plain PEFT folder, whatever
        fsdp_config.state_dict_type says (Trainer writes no adapter file for a sharded state dict, and its full
        state dict reaches peft with storages safetensors cannot read)."""
        if not self.is_fsdp_enabled:
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir or self.args.output_dir
        weights = gathered_adapter_weights(self.model)  # a collective: every rank takes part
        if self.args.should_save:
            self.model.save_pretrained(output_dir, state_dict=weights)
        self.accelerator.wait_for_everyone()

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Resuming under FSDP: the checkpoint's adapter is loaded into the sharded model (each rank takes its shard
        of the full tensors); optimizer, scheduler and RNG states follow through Trainer as usual."""
        if not self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_adapter_weights_sharded(model or self.model_wrapped, Path(resume_from_checkpoint))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        known = inputs.pop(POSITIONS, None)
        if isinstance(self.compute_loss_func, SupervisedLogitsLoss) and inputs.get("labels") is not None:
            inputs["logits_to_keep"] = self.compute_loss_func.positions(inputs["labels"], known)
        if self.vision_placeholder is not None:
            self.vision_placeholder.arm(inputs)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        """Eval loss, plus the task metric by generation (so `metric_for_best_model: vqa_accuracy` works).

        Every rank computes it: Trainer picks the best checkpoint on all ranks."""
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if self.eval_items and eval_dataset is None:
            out = Path(self.args.output_dir) / f"eval-step-{self.state.global_step}"
            task = _score(self.recipe, self.model, self.processing_class, self.eval_items, out,
                          write=self.is_world_process_zero())
            extra = {f"{metric_key_prefix}_{k}": v for k, v in task.items() if isinstance(v, float)}
            metrics.update(extra)
            self.log(extra)
        return metrics

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length":
            if not hasattr(dataset, "lengths"):  # image-text pairs: every text is padded to one length anyway
                return RandomSampler(dataset)
            batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return LengthGroupedSampler(dataset.lengths, batch, seed=seed)
        return super()._get_train_sampler(train_dataset)

    def _get_eval_sampler(self, eval_dataset):
        """The eval loss over rows in length order, from the measured lengths (Trainer's own length grouping would
        encode every eval row again, and cannot measure image-text pairs at all)."""
        if eval_dataset is None:
            return None
        if hasattr(eval_dataset, "lengths"):
            return sorted(range(len(eval_dataset)), key=eval_dataset.lengths.__getitem__)
        return SequentialSampler(eval_dataset)


class ContrastiveTrainer(FinetuneTrainer):
    """A dual encoder's loss: CLIP's InfoNCE or SigLIP's sigmoid loss over the whole batch (across processes)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = dual_encoder_loss(model, inputs)
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with torch.no_grad():
            return dual_encoder_loss(model, self._prepare_inputs(inputs)).detach(), None, None


class ClampLogitScale(TrainerCallback):
    """CLIP keeps its temperature at most 100 (logit_scale <= ln 100) after every optimizer step."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        clamp_logit_scale(model)


class StopOnNonFiniteLoss(TrainerCallback):
    """Stops the run when the logged loss is NaN or infinite, naming the step and the last good checkpoint.

    It reads the loss Trainer already brought to the host for logging (averaged over ranks, so every rank
    stops together), instead of synchronising with the GPU at every step."""

    def __init__(self):
        self.last_logged_step = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            steps = (f"at step {state.global_step}" if state.global_step - self.last_logged_step <= 1 else
                     f"at step {state.global_step} (first in steps {self.last_logged_step + 1}-{state.global_step}; "
                     "train.logging_steps=1 pins it down)")
            last = state.best_model_checkpoint or _newest_checkpoint(args.output_dir)
            raise FinetuneError(
                f"non-finite loss ({loss}) {steps}: lower train.learning_rate, check the data, or use fp32/bf16; "
                f"last good checkpoint: {last or 'none yet'}"
            )
        if loss is not None:
            self.last_logged_step = state.global_step


def _newest_checkpoint(output_dir) -> str | None:
    """The complete checkpoint with the highest step (trainer_state.json is written last)."""
    done = [f for f in Path(output_dir).glob("checkpoint-*")
            if f.name.removeprefix("checkpoint-").isdigit() and (f / "trainer_state.json").is_file()]
    return str(max(done, key=lambda f: int(f.name.removeprefix("checkpoint-")))) if done else None


def setup_logging() -> None:
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[finetune] %(message)s"))
        log.addHandler(handler)
        # One voice under torchrun / accelerate launch: the other processes report warnings only.
        log.setLevel(logging.INFO if is_first_process() else logging.WARNING)


def _as_dict(overrides) -> dict:
    if not overrides:
        return {}
    if isinstance(overrides, dict):
        return overrides
    return parse_overrides(overrides)
