#!/usr/bin/env bash
# The GPU checks, in order, each under its own time budget (seconds, from the variable named):
#   (a) the family matrix, bf16 and 4-bit (tests/test_families.py: training, evaluation and merge for every
#       family, Qwen included where torchvision is installed)                                  MATRIX_SECONDS=240
#   (b) the four demos in bf16, each one's held-out "before -> after" line                  DEMO_SECONDS=45 each
#   (c) with 2 or more GPUs: demo/vqa on 2 GPUs under the shipped ddp, fsdp, zero2 and zero3
#       launch configs, each run's run_info.json `parallelism`                           MULTI_GPU_SECONDS=30 each
#   (d) the QLoRA benchmark on a LLaVA-1.5-7B shape (benchmarks/gpu.py), batch 1 x 1024
#       (checkpoint build included) and mixed-length batch 8             BENCH_SECONDS=180, BENCH8_SECONDS=150
# About 13 minutes on one GPU. A failing step never stops the script: each reports its exit code and time, and a
# summary of every figure ends the output. Logs and figures go to the folder given as $1 (default: gpu-checks).
# RUN_BENCH=0 leaves out (d).
set -uo pipefail
out="${1:-gpu-checks}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export FINETUNE_CACHE="${FINETUNE_CACHE:-/tmp/finetune-gpu-cache}"
began=$SECONDS
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
: > "$out/steps.txt"

# timeout's exit codes: TERM sent at the budget (124), KILL 15 s later (137)
late() { [ "$1" = 124 ] || [ "$1" = 137 ] && echo " (out of time)"; }

# step NAME SECONDS LOG COMMAND...: COMMAND under its own timeout (its whole process group, runners included),
# output to LOG; one line to steps.txt with the exit code and the seconds taken.
step() {
    local name=$1 seconds=$2 log=$3 start=$SECONDS rc
    shift 3
    echo "[$(date +%T)] $name: budget ${seconds} s, log $log"
    timeout -k 15 "$seconds" "$@" > "$log" 2>&1
    rc=$?
    printf '%-22s exit %3d%s, %4d s of %4d\n' "$name" "$rc" "$(late "$rc")" $((SECONDS - start)) "$seconds" \
        | tee -a "$out/steps.txt"
    return "$rc"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; echo "GPUs: $gpus"; } > "$out/gpu.txt" 2>&1
python3 - >> "$out/gpu.txt" 2>&1 <<'PY'
import importlib
for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "deepspeed", "torchvision", "datasets",
             "trl"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as err:  # noqa: BLE001 - a report line, not a failure
        print(name, "not available:", type(err).__name__, str(err).splitlines()[0][:120])
PY
cat "$out/gpu.txt"

# The demos' embedded models are pre-trained on the CPU on first use (minutes): built here, beside the matrix,
# so that the demos' budgets time the demos.
embedded_start=$SECONDS
OMP_NUM_THREADS=8 timeout -k 15 "${EMBEDDED_SECONDS:-400}" python3 -c \
    "from finetune.demo.tiny import tiny_llava_path; from finetune.demo.tiny_clip import tiny_clip_path
print(tiny_llava_path()); print(tiny_clip_path())" > "$out/embedded.log" 2>&1 &
embedded=$!

# (a) model.dtype auto is bf16 on a GPU: the "auto" rows are the bf16 matrix (the "bfloat16" rows would repeat them)
step matrix "${MATRIX_SECONDS:-240}" "$out/matrix.log" \
    python3 -m pytest -q -p no:cacheprovider --maxfail=6 -rs --durations=12 -m "slow or not slow" \
    -k "not bfloat16" tests/test_families.py
tail -25 "$out/matrix.log"

# (b)
wait "$embedded"
rc=$?
printf '%-22s exit %3d%s, %4d s (beside the matrix)\n' "embedded models" "$rc" "$(late "$rc")" \
    $((SECONDS - embedded_start)) | tee -a "$out/steps.txt"
: > "$out/demos.txt"
for demo in vqa retrieval captioning dialogue; do
    rm -rf "$out/demo-$demo"  # a rerun into the same folder starts afresh
    step "demo $demo" "${DEMO_SECONDS:-45}" "$out/demo-$demo.log" \
        python3 -m finetune train "demo/$demo" model.dtype=bfloat16 "output_dir=$out/demo-$demo" \
        || tail -8 "$out/demo-$demo.log"
    line=$(grep -E "held-out .* before .* -> after " "$out/demo-$demo.log" | tail -1)
    echo "$demo: ${line:-no held-out line (see $out/demo-$demo.log)}" | tee -a "$out/demos.txt"
done

# (c)
: > "$out/multi_gpu.txt"
if [ "$gpus" -ge 2 ]; then
    declare -A expected=([ddp]=ddp [fsdp]=fsdp [zero2]=deepspeed-zero2 [zero3]=deepspeed-zero3)
    for name in ddp fsdp zero2 zero3; do
        rm -rf "${out:?}/$name"  # no run_info.json left from an earlier run
        extra=()
        # ZeRO-3 loads the base already partitioned and refuses the before/after generation (a ConfigError).
        [ "$name" = zero3 ] && extra=(eval.before_after=false)
        step "2 GPUs $name" "${MULTI_GPU_SECONDS:-30}" "$out/multi-$name.log" \
            accelerate launch --config_file "$(python3 -m finetune configs --path "$name")" --num_processes 2 \
            -m finetune train demo/vqa model.dtype=bfloat16 "output_dir=$out/$name" ${extra[@]+"${extra[@]}"} \
            || tail -8 "$out/multi-$name.log"
        kind=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['parallelism'])" \
            "$out/$name/run_info.json" 2>/dev/null)
        verdict=$([ "$kind" = "${expected[$name]}" ] && echo ok || echo "WRONG, expected ${expected[$name]}")
        echo "$name: parallelism ${kind:-unknown (no run_info.json)}: $verdict" | tee -a "$out/multi_gpu.txt"
    done
else
    echo "multi-GPU checks (ddp, fsdp, zero2, zero3) need 2 GPUs, this machine has $gpus: they were run on the" \
        "CPU by the test suite instead" | tee -a "$out/multi_gpu.txt"
fi

# (d)
if [ "${RUN_BENCH:-1}" = 1 ]; then
    rm -f "$out"/bench-batch*.json  # the summary reads only this run's figures
    step "bench batch 1" "${BENCH_SECONDS:-180}" "$out/bench-batch1.log" \
        python3 benchmarks/gpu.py --save "$out/bench-batch1.json" || tail -8 "$out/bench-batch1.log"
    sed -n '/^### /,$p' "$out/bench-batch1.log"
    step "bench batch 8" "${BENCH8_SECONDS:-150}" "$out/bench-batch8.log" \
        python3 benchmarks/gpu.py --batch 8 --save "$out/bench-batch8.json" || tail -8 "$out/bench-batch8.log"
    sed -n '/^### /,$p' "$out/bench-batch8.log"
fi

echo
echo "== summary ($(( SECONDS - began )) s in all; logs in $out) =="
cat "$out/steps.txt"
line=$(grep -E '[0-9]+ (passed|failed|errors?)' "$out/matrix.log" | tail -1)
echo "matrix: ${line:-no pytest summary line (see $out/matrix.log)}"
cat "$out/demos.txt" "$out/multi_gpu.txt"
python3 - "$out" <<'PY'
import json
import sys
from pathlib import Path

FIGURES = [("steady_tokens_per_s", "tokens/s 2..N", "{:,.0f}"), ("tokens_per_step", "tokens/step", "{:,.1f}"),
           ("padding", "padding", "{:.1%}"), ("peak_gpu_gib", "peak GiB", "{:.2f}"),
           ("first_step_s", "first step s", "{:.1f}"), ("wall_s", "process s", "{:.1f}")]
for path in sorted(Path(sys.argv[1]).glob("bench-batch*.json")):
    summary = json.loads(path.read_text())
    med = summary["median"]
    parts = []
    for key, label, fmt in FIGURES:
        ours, trl = (med.get(side, {}).get(key) for side in ("ours", "trl"))
        cells = " / ".join("-" if v is None else fmt.format(v) for v in (ours, trl))
        parts.append(f"{label} {cells}" + (f" ({ours / trl:.2f}x)" if ours is not None and trl else ""))
    print(f"bench batch {summary['batch']} ({summary['rows']}), ours / TRL: " + "; ".join(parts))
PY
