"""How a run is distributed: single process, DDP, FSDP or DeepSpeed ZeRO, read from the TrainingArguments and from
the environment that `accelerate launch --config_file` sets; and the check that the run gets what it asked for.

The same names go into run_info.json (`parallelism`) and decide how the model loads (a sharded model gets no
device_map, and its 4-bit weights are stored in the compute dtype, the one dtype FSDP and ZeRO-3 shard).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from finetune.errors import ConfigError

KINDS = ("single", "ddp", "fsdp", "deepspeed-zero2", "deepspeed-zero3")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_first_process() -> bool:
    """Rank 0 under torchrun / accelerate launch (read from the launcher's environment, before any process group
    exists), or a plain process: the one that prints."""
    return os.environ.get("RANK", "0") == "0"


def deepspeed_stage(args=None) -> int | None:
    """The ZeRO stage asked for through `train.deepspeed` (a dict or a JSON file) or an accelerate DeepSpeed config
    (`ACCELERATE_USE_DEEPSPEED`, with the stage in `ACCELERATE_DEEPSPEED_ZERO_STAGE` or the config file it names);
    None without DeepSpeed."""
    config = getattr(args, "deepspeed", None) if args is not None else None
    if config:
        if isinstance(config, (str, Path)):
            config = json.loads(Path(config).read_text())
        return int((config.get("zero_optimization") or {}).get("stage", 0))
    if not _env_true("ACCELERATE_USE_DEEPSPEED"):
        return None
    if os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        return int(os.environ["ACCELERATE_DEEPSPEED_ZERO_STAGE"])
    file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if file and Path(file).is_file():
        return int((json.loads(Path(file).read_text()).get("zero_optimization") or {}).get("stage", 0))
    return 0


def fsdp_requested(args=None) -> bool:
    return bool(getattr(args, "fsdp", None)) or _env_true("ACCELERATE_USE_FSDP")


def parallelism(args=None) -> str:
    """One of KINDS: what the run asked for (`requested_parallelism_is_active` checks it got it)."""
    stage = deepspeed_stage(args)
    if stage is not None:
        return "deepspeed-zero3" if stage == 3 else "deepspeed-zero2"  # stages 0-2 all keep whole weights
    if fsdp_requested(args):
        return "fsdp"
    return "ddp" if world_size() > 1 else "single"


def sharded(args=None) -> bool:
    """FSDP, or DeepSpeed ZeRO-3: each process holds only a shard of the weights."""
    return parallelism(args) in ("fsdp", "deepspeed-zero3")


def use_fsdp_on_cpu(trainer) -> None:
    """accelerate turns an FSDP request into FSDP only on GPU-like devices (AcceleratorState leaves a multi-process
    CPU run as MULTI_CPU, i.e. DDP). torch's FSDP2 (`fully_shard`) itself runs over gloo, so on the CPU the plugin is
    put in place here: the same FSDP2 path a GPU run takes, testable on a CPU."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU or not fsdp_requested(trainer.args):
        return
    # From train.fsdp, or else from the environment an accelerate FSDP config set (the plugin reads it itself).
    plugin_args = trainer.args.fsdp_plugin_args
    plugin = FullyShardedDataParallelPlugin(**plugin_args) if plugin_args else FullyShardedDataParallelPlugin()
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    trainer.is_fsdp_enabled = True


FSDP_NEEDS_PROCESSES = ("FSDP needs at least 2 processes, e.g. `torchrun --nproc_per_node 2 -m finetune train ...` or "
                        "`accelerate launch --config_file $(finetune configs --path fsdp) -m finetune train ...`")


def check_parallelism_request(args) -> None:
    """Before any weight loads: a request that cannot be met here stops in one line."""
    if fsdp_requested(args) and world_size() == 1:
        raise ConfigError(f"FSDP was asked for (train.fsdp / accelerate's FSDP config) on 1 process: "
                          f"{FSDP_NEEDS_PROCESSES}")


def require_requested_parallelism(trainer) -> str:
    """The run's parallelism, after checking that accelerate set up what the run asked for: a request for FSDP or
    DeepSpeed that accelerate dropped stops the run in one line instead of silently training with DDP."""
    asked = parallelism(trainer.args)
    if asked == "fsdp" and not trainer.is_fsdp_enabled:
        raise ConfigError(
            f"FSDP was asked for (train.fsdp / accelerate's FSDP config) but accelerate set up "
            f"{trainer.accelerator.state.distributed_type.value} with {world_size()} process(es): {FSDP_NEEDS_PROCESSES}"
        )
    if asked.startswith("deepspeed") and not trainer.is_deepspeed_enabled:
        raise ConfigError(
            f"DeepSpeed was asked for (train.deepspeed / accelerate's DeepSpeed config) but accelerate set up "
            f"{trainer.accelerator.state.distributed_type.value}: DeepSpeed runs on GPUs (accelerate does not start it "
            "on the CPU); use DDP or FSDP here"
        )
    return asked


def _adapter_parameters(model) -> dict:
    """What a PEFT folder holds: LoRA weights and the trained copies of modules_to_save, by their full names."""
    return {name: param for name, param in model.named_parameters()
            if "lora_" in name or "modules_to_save" in name or param.requires_grad}


def gathered_adapter_weights(model) -> dict:
    """The adapter's full tensors, gathered from an FSDP2 model's shards (a collective: call it on every rank).
    Only the adapter travels, never the frozen base."""
    from torch.distributed.tensor import DTensor

    weights = {}
    for name, param in _adapter_parameters(model).items():
        full = param.full_tensor() if isinstance(param, DTensor) else param
        weights[name] = full.detach().cpu().clone()
    return weights


def load_adapter_weights_sharded(model, folder: Path) -> None:
    """A saved PEFT adapter loaded into an FSDP2 model: each rank keeps its own shard of every full tensor."""
    import torch
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file
    from torch.distributed.tensor import DTensor, distribute_tensor

    saved = load_file(str(folder / "adapter_model.safetensors"))
    # peft's own renaming (adapter name dropped, modules_to_save folded) maps each parameter to its saved key
    for key, param in get_peft_model_state_dict(model, state_dict=_adapter_parameters(model)).items():
        if key not in saved:
            raise ConfigError(f"{folder}: the checkpoint has no {key} (saved by another adapter configuration?)")
        value = saved[key].to(param.dtype)
        if isinstance(param, DTensor):
            value = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
        with torch.no_grad():
            param.copy_(value)


def rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def my_share(items: list) -> list:
    """This process's contiguous slice of `items` (all of them on one process): evaluation splits its work."""
    rank, world = rank_and_world()
    return items[len(items) * rank // world : len(items) * (rank + 1) // world]


def gather_in_order(local: list) -> list:
    """Every process's results concatenated in rank order, on every process: `gather_in_order(f(my_share(x)))`
    equals `f(x)` on one process."""
    import torch.distributed as dist

    world = rank_and_world()[1]
    if world == 1:
        return local
    parts = [None] * world
    dist.all_gather_object(parts, local)
    return [item for part in parts for item in part]


def start_deepspeed_on_cpu(args) -> None:
    """ZeRO-3 partitions the weights while they load (deepspeed.zero.Init), which needs DeepSpeed's own process
    group by then. accelerate starts it with the Trainer's arguments on a GPU only; on the CPU (gloo) it is started
    here, or DeepSpeed falls back to a world of one and rejects the batch sizes."""
    import torch

    if deepspeed_stage(args) is None or torch.cuda.is_available() or world_size() == 1:
        return
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
