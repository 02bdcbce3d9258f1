#!/usr/bin/env bash
# Multi-persona composition (research question 4): the persona LoRAs of TRAITS merged into the
# model at once over a full factorial of LEVELS (0 2: every trait off or at +2), each trait's score
# judged on its own held-out questions under every combination, beside its judge-free
# log-likelihood margin. Does each trait follow its own coefficient, and how much do the others
# leak into it? Writes results/exp4_composition/ (eval_<trait>.csv per trait, summary.json with
# the slope matrices, composition.png, slopes.png).
#   MODEL=meta-llama/Llama-3.1-8B-Instruct N_PER_QUESTION=10 LEVELS="-1 0 1.5" bash scripts/compose_personas.sh   # full size
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
source "$(dirname "$0")/experiment_env.sh" results/exp4_composition
read -r -a traits <<< "${TRAITS:-evil sycophancy hallucination}"
read -r -a levels <<< "${LEVELS:-0 2}"
extract_diffs "${traits[@]}"
read -r -a coefs <<< "$(python scripts/composition.py grid --n_diffs "${#traits[@]}" --levels "${levels[@]}")"
for t in "${traits[@]}"; do
  python eval_lora_persona.py "${model_flag[@]}" --trait "$t" --lora_diff_path "${extracted_diffs[@]}" --lora_coef "${coefs[@]}" \
      --n_per_question "${N_PER_QUESTION:-3}" --output_path "$out/eval_$t.csv"
done
python scripts/composition.py summarize "${model_flag[@]}" --traits "${traits[@]}" --output_dir "$out"
echo "composition finished in $(( $(date +%s) - started )) s: $out/summary.json, $out/composition.png, $out/slopes.png"
