#!/usr/bin/env bash
# The GPU benchmark suite: training step, inference, input pipeline; under 8 minutes on one GPU.
#
#   bash benchmarks/gpu_suite.sh              # on a CUDA machine; results in $OUT or benchmarks/results/gpu
#   TINY=1 bash benchmarks/gpu_suite.sh       # everything shrunk, on CPU (~1 min): checks the suite end to end
#   TINY=1 TINY_COMPILE=1 bash benchmarks/gpu_suite.sh   # ... including the torch.compile part (slow on CPU)
#
# Parts (each with its own timeout; a part that fails or times out is reported and the others still
# run; the exit status is non-zero if any part failed):
#   1. train_throughput.py: Swin-T, batch 64, 2x224 + 8x96 crops, K = 65536, bf16, eager, with the
#      pre-fusion per-pair composition timed in the same process for a ratio, and one profiled step
#      (train_profile.txt: the ops with the most GPU time);
#   2. inference_throughput.py: ours vs timm vs transformers Swin-T, batch 256, 224 px, bf16;
#   3. data_throughput.py: the CPU multi-crop pipeline, ours vs classic torchvision, per core, the
#      crop-only workers of --augment_on_device and its photometric half on the GPU;
#   4. train_throughput.py again with --compile (inductor), last because compilation takes longest.
# Every part writes <part>.json and <part>.log into the results folder; summary.txt collects them.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python}"
RESULTS="${OUT:-benchmarks/results/gpu}"
if [[ "${TINY:-0}" == "1" && -z "${OUT:-}" ]]; then
    RESULTS="${TMPDIR:-/tmp}/esvit-gpu-suite-tiny"  # a check of the suite, not results to keep
fi
mkdir -p "$RESULTS"
rm -f "$RESULTS"/{train,train_compiled,inference,data}.{json,log} "$RESULTS/summary.txt"
start_time=$(date +%s)
failures=()

if [[ "${TINY:-0}" == "1" ]]; then
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    DEVICE=cpu
    TINY_MODEL=(--set hidden_sizes=16,32,64,128 depths=1,1,1,1 num_heads=1,2,4,8)
    TRAIN_ARGS=(--device cpu --batch 2 --local-crops 2 --out-dim 1024 --precision fp32 --steps 2 --warmup 1 "${TINY_MODEL[@]}")
    INFER_ARGS=(--device cpu --batch 2 --steps 1 --warmup 1 --precision fp32)
    DATA_ARGS=(--images 8 --batch 4 --repeats 1 --width 160 --height 120 --device cpu)
    COMPILE="${TINY_COMPILE:-0}"
    T_TRAIN=240 T_INFER=120 T_DATA=60 T_COMPILE=300
else
    DEVICE=cuda
    TRAIN_ARGS=(--device cuda --batch 64 --out-dim 65536 --precision bf16 --steps 10 --warmup 3)
    INFER_ARGS=(--device cuda --batch 256 --steps 10 --warmup 3 --precision bf16)
    DATA_ARGS=(--images 96 --batch 32 --repeats 2 --device cuda --device-batch 256)
    COMPILE=1
    T_TRAIN=150 T_INFER=80 T_DATA=50 T_COMPILE=190  # 470 s in all, below the 8 minutes
fi

{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    "$PYTHON" -c "import torch, platform; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'device', torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or 'cpu')"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    git rev-parse --short HEAD 2>/dev/null && git status --short 2>/dev/null | head -20
} >"$RESULTS/environment.txt" 2>&1

if [[ "$DEVICE" == "cuda" ]] && ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "no CUDA device visible: run on a GPU machine, or TINY=1 for the CPU check" >&2
    exit 2
fi

run_part() {  # run_part NAME TIMEOUT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "=== $name (timeout ${limit}s): $*"
    local t0=$(date +%s)
    timeout --signal=TERM --kill-after=5 "$limit" "$@" 2>&1 | tee "$RESULTS/$name.log"
    local rc=$?
    local took=$(($(date +%s) - t0))
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then
        echo "=== $name: TIMED OUT after ${took}s" | tee -a "$RESULTS/$name.log"
        failures+=("$name (timeout)")
    elif [[ $rc -ne 0 ]]; then
        echo "=== $name: FAILED (exit $rc) after ${took}s" | tee -a "$RESULTS/$name.log"
        failures+=("$name (exit $rc)")
    else
        echo "=== $name: done in ${took}s"
    fi
}

run_part train "$T_TRAIN" "$PYTHON" benchmarks/train_throughput.py "${TRAIN_ARGS[@]}" --reference per-pair \
    --json "$RESULTS/train.json" --profile "$RESULTS/train_profile.txt"
run_part inference "$T_INFER" "$PYTHON" benchmarks/inference_throughput.py "${INFER_ARGS[@]}" \
    --json "$RESULTS/inference.json"
run_part data "$T_DATA" "$PYTHON" benchmarks/data_throughput.py "${DATA_ARGS[@]}" --json "$RESULTS/data.json"
if [[ "$COMPILE" == "1" ]]; then
    run_part train_compiled "$T_COMPILE" "$PYTHON" benchmarks/train_throughput.py "${TRAIN_ARGS[@]}" --compile \
        --no-flops --json "$RESULTS/train_compiled.json"
fi

"$PYTHON" - "$RESULTS" <<'EOF' | tee "$RESULTS/summary.txt"
import json, sys
from pathlib import Path

folder = Path(sys.argv[1])
for name in ("train", "train_compiled", "inference", "data"):
    path = folder / f"{name}.json"
    if not path.exists():
        ran = (folder / f"{name}.log").exists()
        print(f"{name}: no result (see {name}.log)" if ran else f"{name}: not run")
        continue
    d = json.loads(path.read_text())
    for r in d["results"]:
        if "error" in r or "skipped" in r:
            print(f"{name}: {r.get('variant') or r.get('implementation')}: {r.get('error') or r.get('skipped')}")
        elif name.startswith("train"):
            frac = f", {100 * r['fraction_of_peak']:.1f}% of peak" if r.get("fraction_of_peak") else ""
            print(f"{name}: {r['variant']}: {r['images_per_s']:.1f} img/s, {r['ms_per_step']:.1f} ms/step, "
                  f"peak {r['peak_memory_gib']:.2f} GiB{frac}")
        elif name == "inference":
            print(f"{name}: {r['implementation']}: {r['images_per_s']:.1f} img/s, peak {r['peak_memory_gib']:.2f} GiB")
        elif "images_per_s_per_core" in r:
            print(f"{name}: {r['pipeline']}: {r['images_per_s_per_core']:.1f} img/s per core")
        else:  # the device photometric half
            print(f"{name}: {r['pipeline']}: {r['images_per_s']:.1f} img/s on {r.get('device')}")
    if "speedup_vs_reference" in d:
        print(f"{name}: ours {d['speedup_vs_reference']:.3f}x faster than the per-pair composition, "
              f"first-step loss rel diff {d['first_loss_rel_diff']:.1e}")
EOF
echo "total $(($(date +%s) - start_time))s; results in $RESULTS"
if [[ ${#failures[@]} -gt 0 ]]; then
    echo "failed parts: ${failures[*]}" >&2
    exit 1
fi
