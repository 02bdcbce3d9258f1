#!/usr/bin/env bash
# Experiment 3, preventative steering (Persona Vectors' Figure 7 in weight space): finetune on
# trait-inducing data (fresh trait answers to the finetuning questions, elicited with demonstrations)
# without prevention and with the persona kept active during training, as a merged LoRA or as an
# activation vector, over a sweep of coefficients (COEFFICIENTS, default -1 0.25 0.5 1 2: four strengths
# toward the trait and one away), and a control finetune on other data (the trait's neg-prompted
# answers); measure each finetune's drift from the base model (judged, coherence, judge-free margin,
# A/B, MMLU; paired by question or item, with sign-flip p-values) on the plain model, its update's
# norm ‖W_ft − W‖_F and its loss on the answers to 8 held-out finetuning questions (did it learn?).
# Writes results/exp3_prevention/ (eval_*.csv, ab_*.csv, mmlu_*.json, summary.json, drift.png).
#   MODEL=meta-llama/Llama-3.1-8B-Instruct N_EXAMPLES=1000 COEFFICIENTS="-2 -1 0.5 1 2 4" MMLU_N=2000 bash scripts/train_with_prevention.sh
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
source "$(dirname "$0")/experiment_env.sh" results/exp3_prevention
ckpt="ckpt/$model_name/exp3_$trait"
read -r -a coefs <<< "${COEFFICIENTS:--1 0.25 0.5 1 2}"
python extract_persona_lora.py "${model_flag[@]}" --trait "$trait"
python scripts/make_finetuning_data.py "${model_flag[@]}" --trait "$trait" --sides pos neg
python scripts/prevention.py configs "${model_flag[@]}" --training_file "$finetune_data_dir/pos.jsonl" \
    --control_file "$finetune_data_dir/neg.jsonl" --lora_diff_path "$diff_path" --vector_path "$vector_path" "${layer_flag[@]}" --coefs "${coefs[@]}" \
    --n "${N_EXAMPLES:-128}" --training "${TRAINING:-{\}}" --output_dir "$out" --ckpt_dir "$ckpt"
mmlu_flags=(--n "${MMLU_N:-500}")
evaluate_model base
python eval/mmlu.py "${model_flag[@]}" "${mmlu_flags[@]}" --output_path "$out/mmlu_base.json"
mapfile -t names < "$out/runs.txt"
for name in "${names[@]}"; do
  python training.py "$out/configs/$name.json"
  evaluate_model "$name" "$ckpt/$name"
  python eval/mmlu.py "${model_flag[@]}" "${mmlu_flags[@]}" --adapter "$ckpt/$name" --output_path "$out/mmlu_$name.json"
done
python scripts/prevention.py summarize --output_dir "$out" --trait "$trait"
echo "experiment 3 finished in $(( $(date +%s) - started )) s: $out/summary.json, $out/drift.png"
