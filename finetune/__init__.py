"""finetune: adapt pretrained vision-language models to your own images with LoRA / QLoRA.

The public API is imported lazily so `finetune recipes` and `--help` start without loading torch.
"""

from importlib import import_module

from finetune.startup import quiet_optional_kernel_notice

quiet_optional_kernel_notice()  # before anything imports bitsandbytes (see finetune.startup)

__version__ = "0.1.0"
_API = {
    "load_recipe": "finetune.config",
    "Recipe": "finetune.config",
    "train": "finetune.training",
    "FinetuneError": "finetune.errors",
    "evaluate": "finetune.evaluation",
    "predict": "finetune.evaluation",
    "load_adapter": "finetune.run",
    "Run": "finetune.run",
    "push": "finetune.hub",
    "merge": "finetune.run",
    "check_data": "finetune.data.check",
}
__all__ = ["FinetuneError", "Recipe", "Run", "check_data", "evaluate", "load_adapter", "load_recipe", "merge", "predict", "push", "train"]


def __getattr__(name):
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")
