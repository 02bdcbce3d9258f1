#!/usr/bin/env bash
# Judge-free behaviour for every trait, and the extraction setting it depends on (few-shot
# elicitation): each trait is extracted twice, with the small profile's demonstrations (FEWSHOT,
# default 4) and with the system prompt alone (--fewshot 0), both judged by one judge (offline
# unless OPENAI_API_KEY is set); then the persona LoRA and the activation vector of each are swept
# over COEFFICIENTS on the trait's A/B set (forced choice, no judge), with the judge-free
# log-likelihood margin beside it; and the default setting's vector steered at every position.
# Writes results/exp6_ab/ (<trait>_k<K>_{lora,vector}.csv and .summary.json,
# <trait>_k<K>_vector_all.csv, summary.json, table.md, ab.png).
#   TRAITS="evil sycophancy" COEFFICIENTS="-2 0 2" bash scripts/ab_fewshot.sh
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
source "$(dirname "$0")/experiment_env.sh" results/exp6_ab
read -r -a traits <<< "${TRAITS:-evil sycophancy hallucination corrigibility}"
read -r -a coefficients <<< "${COEFFICIENTS:--2 -1 0 1 2}"
fewshot="${FEWSHOT:-4}"
for t in "${traits[@]}"; do
  eval "$(python scripts/persona_paths.py "${model_flag[@]}" --trait "$t" --prefix t_)"
  python extract_persona_lora.py "${model_flag[@]}" --trait "$t" --fewshot "$fewshot"
  python extract_persona_lora.py "${model_flag[@]}" --trait "$t" --fewshot 0 --output_dir "${t_persona_dir}_k0" \
      --vector_output_path "${t_vector_path%_response_avg_diff.pt}_k0_response_avg_diff.pt" --judge_data "$t_judge_data_dir"
  for k in "$fewshot" 0; do
    suffix=""; [ "$k" = 0 ] && suffix="_k0"
    python eval_lora_persona.py "${model_flag[@]}" --trait "$t" --ab_data "dataset/$t/ab.jsonl" \
        --lora_diff_path "${t_persona_dir}${suffix}/${t}_lora_diff.pt" --lora_coef "${coefficients[@]}" \
        --margin --output_path "$out/${t}_k${k}_lora.csv"
    python eval/eval_persona.py "${model_flag[@]}" --trait "$t" --ab_data "dataset/$t/ab.jsonl" \
        --vector_path "${t_vector_path%_response_avg_diff.pt}${suffix}_response_avg_diff.pt" "${layer_flag[@]}" \
        --coef "${coefficients[@]}" --margin --output_path "$out/${t}_k${k}_vector.csv"
  done
  # The vector steered at every position too (a merged LoRA changes how the question and choices
  # are read; response steering does not): A/B only.
  python eval/eval_persona.py "${model_flag[@]}" --trait "$t" --ab_data "dataset/$t/ab.jsonl" --vector_path "$t_vector_path" \
      "${layer_flag[@]}" --steering_type all --coef "${coefficients[@]}" --output_path "$out/${t}_k${fewshot}_vector_all.csv"
done
python scripts/ab_summary.py "${model_flag[@]}" --traits "${traits[@]}" --fewshot "$fewshot" 0 --output_dir "$out"
echo "A/B and few-shot comparison finished in $(( $(date +%s) - started )) s: $out/table.md, $out/summary.json, $out/ab.png"
