#!/usr/bin/env bash
# The main job, on the embedded SmolLM2-135M-Instruct (CPU, no key, no download): extract the
# "evil" persona as a LoRA diff and as an activation vector from the same responses, then steer
# with both over a few coefficients, judge, measure the judge-free margin and the A/B choices,
# print the tables and write the plots.
# MODEL=... TRAIT=... COEFFICIENTS="0 1 2" override the defaults.
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
source "$(dirname "$0")/experiment_env.sh"
read -r -a coefficients <<< "${COEFFICIENTS:-0 1 2}"
python extract_persona_lora.py "${model_flag[@]}" --trait "$trait"
python compare_steering_methods.py "${model_flag[@]}" --trait "$trait" --coefficients "${coefficients[@]}" \
    --n_per_question "${N_PER_QUESTION:-2}" --ab_data "dataset/$trait/ab.jsonl" --output_dir "results/demo_$trait"
python scripts/stage_times.py "$persona_dir/manifest.json" "results/demo_$trait/manifest.json"
echo "demo finished in $(( $(date +%s) - started )) s; plots: results/demo_$trait/behavior.png, results/demo_$trait/ab.png"
