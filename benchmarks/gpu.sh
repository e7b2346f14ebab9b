#!/bin/bash
# The GPU figures of the benchmarks at released architecture sizes (random weights), one after another, in about
# 8 minutes on one H100/H200 (each step is time-boxed; every JSON is written row by row, so a box that runs out
# keeps the rows it finished).
#   bash benchmarks/gpu.sh [OUT_DIR]        (default benchmarks/results)
# What it measures: pairs/s, FLOPs, MFU and peak memory per batch size (DPO and MaPO, SDXL 1024 px); visalign
# against the naive step; each speed lever alone (compile, channels_last, fused_adam, an SDPA kernel); GRPO
# (full SDE, SDE window, and flow_grpo's own loop) on SD3-Medium with MFU; Wan2.1-1.3B DPO and GRPO. The JSON files
# record the device.
set -u
OUT=${1:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
step() { local limit=$1; shift; echo "== $*"; timeout "$limit" "$@" || echo "!! exit $? for: $*"; }
SDXL="--preset sdxl --resolution 1024 --steps 3 --warmup 1 --dtype bf16 --device cuda"
# 1. MFU per batch: DPO and MaPO with checkpointing at 1, 2, 4 pairs (MaPO/DPO pairs/s at each batch)
step 120 python3 benchmarks/bench_dpo.py $SDXL --batches 1,2,4 --gradient_checkpointing \
    --methods "dpo visalign,mapo visalign" --out "$OUT/bench_dpo_sdxl_1024_batches_gpu.json"
# 2. visalign against the naive step at batch 1 (no checkpointing: the released figures' setting)
step 90 python3 benchmarks/bench_dpo.py $SDXL --batch 1 --out "$OUT/bench_dpo_sdxl_1024_gpu.json"
# 3. each lever alone on the DPO step, batch 1 (compile's first steps compile: --warmup 2)
step 110 python3 benchmarks/bench_dpo.py $SDXL --batch 1 --warmup 2 --methods "dpo visalign" \
    --levers base,compile,channels_last,fused_adam,sdpa-cudnn,sdpa-flash --out "$OUT/bench_dpo_sdxl_1024_levers_gpu.json"
# 4. GRPO on SD3-Medium: full SDE and SDE window, with and without compile, and flow_grpo's own loop (one row)
step 110 python3 benchmarks/bench_grpo.py --preset sd3 --resolution 512 --prompts 2 --group 4 --train_batch 2 \
    --repeats 1 --dtype bfloat16 --device cuda --levers base,compile --out "$OUT/bench_grpo_sd3_512_gpu.json"
# 5. Wan2.1-1.3B video: DPO / MaPO (no naive: it ran past its box before) and GRPO
step 45 python3 benchmarks/bench_dpo.py --preset wan-1.3b --resolution 480 --num_frames 17 --batch 1 --steps 3 \
    --warmup 1 --dtype bf16 --gradient_checkpointing --device cuda --methods "dpo visalign,mapo visalign" \
    --out "$OUT/bench_dpo_wan13b_480x17_gpu.json"
step 45 python3 benchmarks/bench_grpo.py --preset wan-1.3b --resolution 480 --num_frames 17 --prompts 1 --group 4 \
    --train_batch 2 --repeats 1 --warmup 0 --modes "SDE window" --dtype bfloat16 --gradient_checkpointing \
    --device cuda --out "$OUT/bench_grpo_wan13b_480x17_gpu.json"
# 6. (issue 23, last: about 3 min, run it alone if the box above is spent) the streaming data path against a
#    resident batch, SDXL architecture at 1024 px, JPEGs decoded in 4 workers: goal >= 0.95 of the throughput
step 200 python3 benchmarks/bench_stream.py --preset sdxl --resolution 1024 --batch 1 --steps 8 --warmup 2 \
    --dtype bf16 --gradient_checkpointing --num_workers 4 --device cuda --out "$OUT/bench_stream_sdxl_1024_gpu.json"
