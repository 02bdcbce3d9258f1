#!/usr/bin/env bash
# Experiment 1, steering effectiveness (Persona Vectors' Figure 3 in weight space): the trait score
# against the coefficient for the merged persona LoRA and for activation steering, on the same
# held-out questions, seeds and judge; beside it the judge-free log-likelihood margin and the
# forced-choice A/B p_matching; slopes paired by question, coherence, latency and the
# activation-space analysis. Writes results/exp1_steering/ (behavior.csv, behavior.png, ab.csv,
# ab.png, spaces.png, latency.json, comparison.json: the headline fits).
#   MODEL=meta-llama/Llama-3.1-8B-Instruct N_PER_QUESTION=10 bash scripts/eval_lora_steering.sh   # full size
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
source "$(dirname "$0")/experiment_env.sh" results/exp1_steering
read -r -a coefficients <<< "${COEFFICIENTS:-0 0.5 1 1.5 2}"
python extract_persona_lora.py "${model_flag[@]}" --trait "$trait"
python compare_steering_methods.py "${model_flag[@]}" --trait "$trait" --coefficients "${coefficients[@]}" \
    --n_per_question "${N_PER_QUESTION:-3}" --ab_data "dataset/$trait/ab.jsonl" --output_dir "$out" --test_latency --analyze_spaces
echo "experiment 1 finished in $(( $(date +%s) - started )) s: $out/comparison.json, $out/behavior.png, $out/ab.png, $out/spaces.png"
