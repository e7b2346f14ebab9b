#!/bin/bash
# The GPU figures of the benchmarks at released architecture sizes (random weights), one after another.
#   bash benchmarks/gpu.sh [OUT_DIR]        (default benchmarks/results; each step is time-boxed)
# Each benchmark compares visalign's way with the naive way (DPO/MaPO) or a full SDE with an SDE window (GRPO)
# in one run; the JSON files record the device.
set -u
OUT=${1:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
step() { local limit=$1; shift; echo "== $*"; timeout "$limit" "$@" || echo "!! exit $? for: $*"; }
step 140 python3 benchmarks/bench_dpo.py --preset sdxl --resolution 1024 --batch 1 --steps 3 --warmup 1 \
    --dtype bf16 --device cuda --out "$OUT/bench_dpo_sdxl_1024_gpu.json"
step 110 python3 benchmarks/bench_grpo.py --preset sd3 --resolution 512 --prompts 2 --group 4 --train_batch 2 \
    --repeats 2 --dtype bfloat16 --device cuda --out "$OUT/bench_grpo_sd3_512_gpu.json"
step 110 python3 benchmarks/bench_dpo.py --preset wan-1.3b --resolution 480 --num_frames 17 --batch 1 --steps 3 \
    --warmup 1 --dtype bf16 --gradient_checkpointing --device cuda --out "$OUT/bench_dpo_wan13b_480x17_gpu.json"
step 110 python3 benchmarks/bench_grpo.py --preset wan-1.3b --resolution 480 --num_frames 17 --prompts 1 --group 4 \
    --train_batch 2 --repeats 1 --dtype bfloat16 --gradient_checkpointing --device cuda \
    --out "$OUT/bench_grpo_wan13b_480x17_gpu.json"
step 100 python3 benchmarks/bench_dpo.py --preset cogvideox-2b --resolution 480 --num_frames 17 --batch 1 --steps 3 \
    --warmup 1 --dtype bf16 --gradient_checkpointing --device cuda --out "$OUT/bench_dpo_cogvideox2b_480x17_gpu.json"
