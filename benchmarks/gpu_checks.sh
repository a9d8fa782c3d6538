#!/usr/bin/env bash
# The GPU checks, on a machine with one GPU: the family matrix (tests/test_families.py: 16-bit and 4-bit training,
# evaluation and merge for every family, Qwen included where torchvision is installed) and the QLoRA benchmark on a
# LLaVA-1.5-7B shape (benchmarks/gpu.py). Logs and figures go to the folder given as $1 (default: gpu-checks).
set -uo pipefail
out="${1:-gpu-checks}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export FINETUNE_CACHE="${FINETUNE_CACHE:-/tmp/finetune-gpu-cache}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
python3 - >> "$out/gpu.txt" 2>&1 <<'PY'
import importlib
for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "torchvision", "datasets", "trl"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as err:  # noqa: BLE001 - a report line, not a failure
        print(name, "not available:", type(err).__name__, str(err).splitlines()[0][:120])
PY
cat "$out/gpu.txt"
timeout "${MATRIX_SECONDS:-180}" python3 -m pytest -q -p no:cacheprovider --maxfail=6 -rs --durations=12 \
    -m "slow or not slow" tests/test_families.py 2>&1 | tee "$out/matrix.log" | tail -25
[ "${RUN_BENCH:-1}" = 1 ] || exit 0
timeout "${BENCH_SECONDS:-270}" python3 benchmarks/gpu.py > "$out/gpu_table.txt" 2> "$out/gpu.log"
echo "gpu.py exit $?"; tail -15 "$out/gpu.log"; cat "$out/gpu_table.txt"
