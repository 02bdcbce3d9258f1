#!/usr/bin/env bash
# Experiment 1, steering effectiveness (Persona Vectors' Figure 3 in weight space): the trait score
# against the coefficient for the merged persona LoRA and for activation steering, on the same
# held-out questions, seeds and judge; slope, R², coherence at each coefficient, latency and the
# activation-space analysis. Writes results/exp1_steering/ (behavior.csv, behavior.png, spaces.png,
# latency.json, comparison.json: the headline fits).
#   MODEL=meta-llama/Llama-3.1-8B-Instruct N_PER_QUESTION=10 bash scripts/eval_lora_steering.sh   # full size
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
source "$(dirname "$0")/experiment_env.sh"
out="${OUTPUT_DIR:-results/exp1_steering}"
python extract_persona_lora.py "${model_flag[@]}" --trait "$trait"
# shellcheck disable=SC2086
python compare_steering_methods.py "${model_flag[@]}" --trait "$trait" --coefficients ${COEFFICIENTS:-0 0.5 1 1.5 2} \
    --n_per_question "${N_PER_QUESTION:-3}" --output_dir "$out" --test_latency --analyze_spaces
echo "experiment 1 finished in $(( $(date +%s) - started )) s: $out/comparison.json, $out/behavior.png, $out/spaces.png"
