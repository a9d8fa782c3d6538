"""The shipped `accelerate launch --config_file` files: listed by `finetune configs`, accepted by accelerate."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

from finetune.errors import ConfigError
from finetune.launch_configs import config_path, description, shipped_configs

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = {"ddp": ("MULTI_GPU", {}, {}), "fsdp": ("FSDP", {"fsdp_version": 2}, {}),
            "zero2": ("DEEPSPEED", {}, {"zero_stage": 2}), "zero3": ("DEEPSPEED", {}, {"zero_stage": 3})}


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "finetune", *args], check=False, capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_the_listing_names_the_four_configs_with_description_and_path():
    assert list(shipped_configs()) == sorted(EXPECTED)
    done = run_cli("configs")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == sorted(EXPECTED)
    for line, (name, path) in zip(lines, shipped_configs().items()):
        assert description(path) and description(path) in line and line.endswith(str(path))
        assert f"--path {name}" in description(path)  # the description says how to use it


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_accelerate_loads_every_config(name):
    distributed_type, fsdp, deepspeed = EXPECTED[name]
    config = load_config_from_file(str(config_path(name)))  # raises on a key accelerate does not know
    assert config.distributed_type == distributed_type
    assert config.mixed_precision == "bf16" and config.num_processes == 2
    assert fsdp.items() <= config.fsdp_config.items() and deepspeed.items() <= config.deepspeed_config.items()


def test_zero3_gathers_weights_and_fsdp_keeps_plain_state_dicts():
    zero3 = load_config_from_file(str(config_path("zero3"))).deepspeed_config
    assert zero3["zero3_init_flag"] and zero3["zero3_save_16bit_model"]
    assert zero3["offload_param_device"] == zero3["offload_optimizer_device"] == "none"
    fsdp = load_config_from_file(str(config_path("fsdp"))).fsdp_config
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT" and fsdp["fsdp_reshard_after_forward"]
    assert fsdp["fsdp_cpu_ram_efficient_loading"] is False


def test_path_prints_only_an_existing_absolute_path():
    done = run_cli("configs", "--path", "fsdp")
    assert done.returncode == 0, done.stderr[-2000:]
    path = Path(done.stdout.strip())
    assert done.stdout.count("\n") == 1 and path.is_absolute() and path.is_file() and path.name == "fsdp.yaml"


def test_an_unknown_name_is_one_error_line_with_a_suggestion():
    with pytest.raises(ConfigError, match="did you mean fsdp"):
        config_path("fsdq")
    done = run_cli("configs", "--path", "fsdq")
    assert done.returncode == 2 and done.stdout == ""
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: ") and "did you mean fsdp" in line


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_accelerate_launch_starts_two_cpu_processes_from_the_ddp_file(tmp_path):
    # `--cpu` would take accelerate's single-process launcher (it starts several CPU processes only through MPI);
    # without it the file's MULTI_GPU starts --num_processes processes, and cpu=True (what training_arguments'
    # use_cpu gives a multi-process CPU run) puts them on gloo. PartialState() alone would leave each on its own.
    script = tmp_path / "ranks.py"
    # Each process writes its own file: two processes printing to one pipe interleave ("22  01").
    script.write_text("from pathlib import Path\nfrom accelerate import PartialState\n"
                      "s = PartialState(cpu=True)\n"
                      "Path(f'rank{s.process_index}.txt').write_text(f'{s.num_processes} {s.process_index}')\n")
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_path("ddp")),
                           "--num_processes", "2", "--main_process_port", str(free_port()), str(script)],
                          capture_output=True, text=True, cwd=tmp_path, check=False, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.read_text() for p in tmp_path.glob("rank*.txt")) == ["2 0", "2 1"], done.stdout
