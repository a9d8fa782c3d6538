"""The benchmark scripts run end to end on the CPU: benchmarks/gpu.py's code path with --tiny, and vs_trl.py for one
step. TRL's side runs where TRL is installed (`pip install -e .[bench]`), and is skipped otherwise."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HAS_TRL = importlib.util.find_spec("trl") is not None
SIDES = ["ours", "trl"] if HAS_TRL else ["ours"]


def bench(script, *args):
    only = [] if HAS_TRL else ["--only", "ours"]
    done = subprocess.run([sys.executable, f"benchmarks/{script}", *args, *only, "--json"], check=False, cwd=ROOT,
                          text=True, capture_output=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_gpu_benchmark_runs_its_code_path_on_the_cpu(tmp_path):
    summary = bench("gpu.py", "--tiny", "--steps", "1", "--seq", "700", "--work", str(tmp_path))
    assert sorted(summary["runs"]) == sorted(SIDES)
    runs = [r for side in SIDES for r in summary["runs"][side]]
    for run in runs:
        # One step of one example cut to --seq tokens (576 of them image tokens), nothing padded, logged alike.
        assert run["steps"] == 1 and run["real_tokens"] == run["tensor_tokens"] == run["tokens_per_step"] == 700
        assert run["tokens_each_step"] == [700] and run["logging_steps"] == summary["logging_steps"]
        assert run["trainable_parameters"] > 0 and run["wall_s"] > run["train_s"] > 0 and run["peak_rss_mib"] > 0
        if summary["quantization"] == "nf4":
            assert run["linear4bit_layers"] > 0
    # Both sides train the same LoRA parameters on the same 4-bit layers.
    assert len({(r["trainable_parameters"], r["linear4bit_layers"]) for r in runs}) == 1
    assert summary["tokens_per_step"] == {"ours": 700, **({"trl": 700, "ratio": 1.0} if HAS_TRL else {})}
    assert (tmp_path / "runs" / "ours" / "adapter_model.safetensors").is_file()


def test_gpu_benchmark_mixed_length_batch_trains_both_sides_on_the_same_tokens(tmp_path):
    summary = bench("gpu.py", "--tiny", "--steps", "1", "--batch", "8", "--seq", "700", "--work", str(tmp_path))
    assert summary["batch"] == 8 and summary["rows"] == "mixed"
    lo, hi = summary["answer_tokens"]
    assert 1 <= lo < hi <= 700 - 576
    runs = {side: summary["runs"][side][0] for side in SIDES}
    for run in runs.values():
        # Every row once (one epoch of --steps x --batch rows), so both sides train on the same non-pad tokens.
        assert run["steps"] == 1 and 8 * (576 + lo) < run["real_tokens"] <= run["tensor_tokens"]
        assert run["tokens_per_step"] == run["real_tokens"] == summary["tokens_per_step"]["ours"]
    if HAS_TRL:
        assert summary["tokens_per_step"]["ratio"] == 1.0
        assert runs["ours"]["padding"] <= runs["trl"]["padding"]


@pytest.mark.slow
def test_vs_trl_measures_both_sides_the_same_way(tmp_path):
    summary = bench("vs_trl.py", "--repeats", "1", "--steps", "2", "--batch", "4", "--fixture", str(tmp_path / "fx"),
                    "--work", str(tmp_path / "work"))
    assert summary["fixture"]["samples"] == 256 and 4.0e6 < summary["fixture"]["parameters"] < 4.6e6
    for side in SIDES:
        run = summary["runs"][side][0]
        assert run["steps"] == 2 and 0 < run["real_tokens"] <= run["tensor_tokens"]
        assert run["tokens_per_step"] == run["real_tokens"] / 2 and run["logging_steps"] == 10
        assert 0 <= run["padding"] < 1 and run["first_step_s"] < run["wall_s"]


def test_dropout_benchmark_prints_both_sides():
    done = subprocess.run([sys.executable, "benchmarks/dropout.py", "--shape", "4", "64", "--repeats", "2"], cwd=ROOT,
                          text=True, capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "torch nn.Dropout" in done.stdout and "CpuDropout" in done.stdout


def test_lora_layer_benchmark_prints_both_forwards():
    done = subprocess.run([sys.executable, "benchmarks/lora_layer.py", "--tokens", "16", "--features", "8", "12",
                           "--r", "2", "--repeats", "1"], cwd=ROOT, text=True, capture_output=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "peft's forward" in done.stdout and "finetune.lora_forward" in done.stdout
