"""Start-up: commands import what they need and nothing else; bitsandbytes only for 4-bit, and quietly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.startup import _quantization

ROOT = Path(__file__).resolve().parents[1]
NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


def python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300, check=False)


def test_the_recipe_says_whether_bitsandbytes_is_needed(tmp_path):
    assert _quantization("demo/vqa", []) == "none"
    assert _quantization("demo/vqa", ["model.quantization=4bit"]) == "4bit"
    assert _quantization("vqa", []) == "4bit"  # the shipped QLoRA recipe
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(json.dumps({"model": {"quantization": "4bit"}}))
    assert _quantization(str(run), []) == "4bit"
    assert _quantization("someone/a-hub-run", []) is None  # unknown: nothing is skipped
    assert _quantization("demo/vqa", ["not an override"]) is None


def test_listing_recipes_imports_no_heavy_library():
    done = python("from finetune.cli import main; main(['recipes'])", "-X", "importtime")
    assert done.returncode == 0, done.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert not imported & {"torch", "transformers", "peft", "datasets", "bitsandbytes", "numpy"}


@pytest.mark.skipif(sys.platform != "linux", reason="bitsandbytes' CPU notice is what is checked here")
def test_a_run_without_4bit_never_imports_bitsandbytes_and_lora_still_attaches(random_tiny):
    pytest.importorskip("bitsandbytes")
    code = f"""
import sys
from finetune.startup import skip_bitsandbytes_unless_needed
assert skip_bitsandbytes_unless_needed("demo/vqa", [])
from transformers import AutoModelForImageTextToText
import finetune.training  # Trainer, peft
from finetune.adapters import attach_adapters
from finetune.config import AdapterConfig
model = attach_adapters(AutoModelForImageTextToText.from_pretrained({str(random_tiny)!r}), AdapterConfig())
assert any("lora_" in name for name, _ in model.named_parameters())
assert sys.modules.get("bitsandbytes") is None, "bitsandbytes was imported"
"""
    done = python(code)
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_optional_kernel_notice_is_dropped_and_nothing_else():
    pytest.importorskip("bitsandbytes")
    plain = python("import bitsandbytes")
    quiet = python("import finetune, bitsandbytes, logging\n"
                   "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('another warning')")
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert NOTICE not in quiet.stderr and "another warning" in quiet.stderr
    if NOTICE not in plain.stderr:
        pytest.skip("bitsandbytes prints no such notice on this CPU (no AVX512-BF16, or `kernels` installed)")


def test_deepspeed_stays_out_unless_the_run_uses_it(tmp_path):
    """transformers imports DeepSpeed whenever it is installed; where it is, `finetune` keeps it out of runs that
    do not use it (on a machine without a GPU it prints a notice on stdout at import)."""
    code = ("import sys; from finetune.startup import skip_deepspeed_unless_needed as skip; "
            "print(skip(sys.argv[1], sys.argv[2:]))")

    def skipped(*argv, **env):
        done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT), **env}, timeout=300, check=False)
        assert done.returncode == 0, done.stderr[-1000:]
        return done.stdout.strip() == "True"

    asked = tmp_path / "ds.json"
    asked.write_text("{}")
    assert skipped("demo/vqa")
    assert not skipped("demo/vqa", f"train.deepspeed={asked}")
    assert not skipped("someone/a-hub-run")  # an unreadable recipe: nothing is skipped
    assert not skipped("demo/vqa", ACCELERATE_USE_DEEPSPEED="true")  # accelerate launch with a DeepSpeed config
    done = python("from finetune.cli import main; main(['configs', '--path', 'fsdp'])")
    assert done.stdout.strip().endswith("fsdp.yaml") and len(done.stdout.splitlines()) == 1
