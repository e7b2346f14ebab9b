#!/usr/bin/env bash
# MaPO and Diffusion-DPO on a whole-image style preference in the shapes world: toy-sd's samples ranked by their
# colour saturation (the `stats(stat=saturation)` reward), best against worst of 4 per caption, 160 pairs; both
# trainers on the same pairs for the same steps; both judged on 256 fresh seeds per split by the saturation and by
# the oracle (which the pairs never saw). Prints the saturation gain, strict accuracy and seconds per step of each.
# Figures and what they show: docs/experiments/mapo_style.md.
#   bash examples/shapes_world/mapo_style.sh OUT [STEPS]      (default 150 steps)
set -euo pipefail
OUT=${1:?usage: mapo_style.sh OUT [STEPS]}
STEPS=${2:-150}
TOY=assets/toyworld
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
REWARD="stats(stat=saturation)"
visalign pairs --model $TOY/toy-sd --reward "$REWARD" --prompts $TOY/prompts/held_in.txt --per_prompt 4 \
    --repeats 2 --seed 1000 --out "$OUT/pairs"
TRAIN=(--model $TOY/toy-sd --data "$OUT/pairs" --max_steps "$STEPS" --batch_size 16 --lora_rank 8 --resolution 64
       --lr_scheduler constant)
visalign train mapo "${TRAIN[@]}" --learning_rate 2e-4 --output_dir "$OUT/mapo"  # beta 0.1, the paper's code
visalign train diffusion-dpo "${TRAIN[@]}" --learning_rate 3e-4 --beta 100 --output_dir "$OUT/dpo"
for split in held_in held_out; do
    visalign evaluate --model $TOY/toy-sd --lora "$OUT/mapo/final" "$OUT/dpo/final" --prompts $TOY/prompts/$split.txt \
        --oracle --reward "$REWARD" --n 256 --seed 100000 --steps 20 --guidance 3 --out "$OUT/evaluate/$split"
done
python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
for split in ("held_in", "held_out"):
    rows = json.load(open(f"{out}/evaluate/{split}/report.json"))["variants"]
    base = rows["base"]
    for name, row in rows.items():
        gain = row["saturation"] / base["saturation"] - 1
        print(f"{split:9s} {name:11s} saturation {row['saturation']:.4f} ({gain:+.1%})  "
              f"strict {row['oracle/all/strict_acc']:.1%}")
for run in ("mapo", "dpo"):
    t = json.load(open(f"{out}/{run}/timing.json"))
    print(f"{run}: {t['seconds_per_step']:.3f} s/step over {t['steps']} steps")
PY
