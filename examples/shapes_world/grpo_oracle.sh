#!/usr/bin/env bash
# GRPO on the shapes world's toy-sd (DDIM-eta SDE), rewarded by the oracle's graded verdict, judged by the oracle on
# held-in and held-out captions (during training: 160 held-in + 80 held-out samples every 25 steps; after it: 256
# fresh seeds per split). Leaves the Diffusers LoRA at OUT/final, the evaluation at
# OUT/evaluate/{held_in,held_out}/report.json and the learning curve at OUT/curve.png. Figures and what they show:
# docs/experiments/online_rl.md.
#   bash examples/shapes_world/grpo_oracle.sh OUT [STEPS] [SEED] [EXTRA TRAIN FLAGS...]   (default 150 steps, seed 0)
# MODEL=assets/toyworld/toy-flow picks another model (flow_grpo_oracle.sh: Flow-GRPO on toy-flow).
set -euo pipefail
OUT=${1:?usage: grpo_oracle.sh OUT [STEPS] [SEED] [EXTRA TRAIN FLAGS...]}
STEPS=${2:-150}
SEED=${3:-0}
shift $(( $# < 3 ? $# : 3 ))
TOY=assets/toyworld
MODEL=${MODEL:-$TOY/toy-sd}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
mkdir -p "$OUT"
{ cat $TOY/prompts/held_in.txt; for _ in 1 2 3 4; do cat $TOY/prompts/held_out.txt; done; } > "$OUT/eval_prompts.txt"
visalign train grpo --preset toy-flow-clip --model "$MODEL" --guidance 3 --eval_guidance 3 \
    --reward "oracle(score=dense)" --learning_rate 3e-3 --lr_scheduler cosine --beta_kl 0.01 \
    --max_steps "$STEPS" --eval_every 25 --eval_samples 240 --eval_prompts "$OUT/eval_prompts.txt" \
    --seed "$SEED" --report_to tensorboard --output_dir "$OUT" "$@"
for split in held_in held_out; do  # 256 samples per split on seeds the training never saw
    visalign evaluate --model "$MODEL" --lora "$OUT/final" --prompts $TOY/prompts/$split.txt --oracle \
        --n 256 --seed 100000 --steps 20 --guidance 3 --out "$OUT/evaluate/$split"
done
python "$(dirname "$0")/plot_grpo.py" "$OUT/curve.png" "$OUT"
