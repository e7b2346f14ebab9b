#!/usr/bin/env bash
# Flow-GRPO (Flow-SDE, a = 0.7) on the shapes world's toy-flow, rewarded by the oracle's graded verdict: the recipe of
# grpo_oracle.sh on the flow-matching model, for 75 steps (a toy-flow step costs about twice a toy-sd one). Leaves
# the Diffusers LoRA at OUT/final, the evaluation at OUT/evaluate/{held_in,held_out}/report.json and the learning
# curve at OUT/curve.png. Figures and what they show: docs/experiments/online_rl.md.
#   bash examples/shapes_world/flow_grpo_oracle.sh OUT [STEPS] [SEED] [EXTRA TRAIN FLAGS...]  (default 75 steps, seed 0)
set -euo pipefail
OUT=${1:?usage: flow_grpo_oracle.sh OUT [STEPS] [SEED] [EXTRA TRAIN FLAGS...]}
STEPS=${2:-75}
SEED=${3:-0}
shift $(( $# < 3 ? $# : 3 ))
MODEL=assets/toyworld/toy-flow exec bash "$(dirname "$0")/grpo_oracle.sh" "$OUT" "$STEPS" "$SEED" "$@"
