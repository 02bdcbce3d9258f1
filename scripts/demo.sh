#!/usr/bin/env bash
# The main job, on the embedded SmolLM2-135M-Instruct (CPU, no key, no download): extract the
# "evil" persona as a LoRA diff and as an activation vector from the same responses, then steer
# with both over a few coefficients, judge, print the table and write the plot.
# MODEL=... TRAIT=... COEFFICIENTS="0 1 2" override the defaults.
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
trait="${TRAIT:-evil}"
model_flag=()
[ -n "${MODEL:-}" ] && model_flag=(--model "$MODEL")
started=$(date +%s)
python extract_persona_lora.py "${model_flag[@]}" --trait "$trait"
# shellcheck disable=SC2086
python compare_steering_methods.py "${model_flag[@]}" --trait "$trait" --coefficients ${COEFFICIENTS:-0 1 2} \
    --n_per_question "${N_PER_QUESTION:-2}" --output_dir "results/demo_$trait"
echo "demo finished in $(( $(date +%s) - started )) s; plot: results/demo_$trait/behavior.png"
