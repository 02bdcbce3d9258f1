#!/usr/bin/env bash
# Experiment 3, preventative steering (Persona Vectors' Figure 7 in weight space): finetune on
# trait-inducing data (the extraction's trait answers) without prevention and with the persona
# kept active during training, as a merged LoRA or as an activation vector, at coefficients of
# both signs; judge each finetune's trait drift and MMLU on the plain model.
# Writes results/exp3_prevention/ (eval_*.csv, mmlu_*.json, summary.json, drift.png).
#   MODEL=meta-llama/Llama-3.1-8B-Instruct N_EXAMPLES=1000 COEFS="-2 -1 1 2" MMLU_N=1000 bash scripts/train_with_prevention.sh
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
source "$(dirname "$0")/experiment_env.sh"
out="${OUTPUT_DIR:-results/exp3_prevention}"
ckpt="ckpt/$model_name/exp3_$trait"
python extract_persona_lora.py "${model_flag[@]}" --trait "$trait"
# shellcheck disable=SC2086
python scripts/prevention.py configs "${model_flag[@]}" --training_file "$persona/data/pos.jsonl" \
    --lora_diff_path "$persona/${trait}_lora_diff.pt" --vector_path "persona_vectors/$model_name/${trait}_response_avg_diff.pt" \
    --layer "${LAYER:-20}" --coefs ${COEFS:--1 1} --n "${N_EXAMPLES:-64}" --training "${TRAINING:-{\}}" \
    --output_dir "$out" --ckpt_dir "$ckpt"
eval_flags=(--trait "$trait" --n_per_question "${N_PER_QUESTION:-2}")
python eval_lora_persona.py "${model_flag[@]}" "${eval_flags[@]}" --output_path "$out/eval_base.csv"
python eval/mmlu.py "${model_flag[@]}" --n "${MMLU_N:-100}" --output_path "$out/mmlu_base.json"
for config in "$out"/configs/*.json; do
  name="$(basename "$config" .json)"
  [ -f "$ckpt/$name/training.json" ] || python training.py "$config"
  python eval_lora_persona.py "${model_flag[@]}" "${eval_flags[@]}" --adapter "$ckpt/$name" --output_path "$out/eval_$name.csv"
  python eval/mmlu.py "${model_flag[@]}" --adapter "$ckpt/$name" --n "${MMLU_N:-100}" --output_path "$out/mmlu_$name.json"
done
python scripts/prevention.py summarize --output_dir "$out" --trait "$trait"
echo "experiment 3 finished in $(( $(date +%s) - started )) s: $out/summary.json, $out/drift.png"
