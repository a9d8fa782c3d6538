"""TRL's SFTTrainer on the benchmark fixture, the way TRL's docs train a vision-language model: a `messages` +
`images` dataset, the model's processor as processing_class (SFTTrainer then collates with its own
DataCollatorForVisionLanguageModeling: chat template + processor per batch, padded), a peft LoraConfig.

    python benchmarks/_trl_runner.py CONFIG.json

CONFIG.json: model, data, output_dir, max_length, steps, batch, learning_rate, logging_steps (the parent passes
ours the same: each log reads the loss back from the GPU), seed, lora {r, alpha, dropout, targets}, and optionally
quantization "4bit", bf16, gradient_checkpointing (benchmarks/gpu.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from _measure import BenchCallback, CountingCollator, log


def main(config_path: str) -> None:
    cfg = json.loads(Path(config_path).read_text())
    import torch
    from datasets import Image, List, load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import SFTConfig, SFTTrainer

    log("loading the data")
    root = Path(cfg["data"]).parent
    dataset = load_dataset("json", data_files=cfg["data"], split="train")
    dataset = dataset.map(lambda row: {"images": [str(root / p) for p in row["images"]]})
    dataset = dataset.cast_column("images", List(Image()))  # decoded when a batch is collated
    dataset = dataset.select_columns(["messages", "images"])

    log("loading the model")
    dtype = torch.bfloat16 if cfg.get("bf16") else torch.float32
    kwargs = {"dtype": dtype}
    if cfg.get("quantization") == "4bit":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=cfg.get("skip_modules"))
        kwargs["device_map"] = {"": 0} if torch.cuda.is_available() else None
    model = AutoModelForImageTextToText.from_pretrained(cfg["model"], **kwargs)
    processor = AutoProcessor.from_pretrained(cfg["model"])

    lora = cfg["lora"]
    peft_config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                             target_modules=lora["targets"], bias="none", task_type="CAUSAL_LM")
    args = SFTConfig(
        output_dir=cfg["output_dir"], max_length=cfg["max_length"], max_steps=cfg["steps"],
        per_device_train_batch_size=cfg["batch"], learning_rate=cfg["learning_rate"], lr_scheduler_type="cosine",
        warmup_steps=0.03, logging_steps=cfg["logging_steps"], save_strategy="no", report_to="none",
        dataloader_num_workers=0, seed=cfg["seed"], bf16=bool(cfg.get("bf16")),
        gradient_checkpointing=bool(cfg.get("gradient_checkpointing")),
        gradient_checkpointing_kwargs={"use_reentrant": False}, dataloader_pin_memory=torch.cuda.is_available(),
    )
    callback = BenchCallback()
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor,
                         peft_config=peft_config, callbacks=[callback])
    callback.counter = trainer.data_collator = CountingCollator(trainer.data_collator)
    log(f"training {cfg['steps']} steps of {cfg['batch']}")
    trainer.train()
    trainer.save_model(cfg["output_dir"])
    log(f"saved {cfg['output_dir']}")


if __name__ == "__main__":
    main(sys.argv[1])
