#!/usr/bin/env bash
# Experiment 2, finetuning prediction (Persona Vectors' Figure 6 in weight space): finetune on
# datasets whose trait content varies (the extraction's own trait / anti-trait answers mixed at
# RATIOS percent), judge each finetune's trait score, project each finetune's weight change onto
# the persona diff, and report the Pearson correlation (the seed expects r > 0.7) and the scatter.
# OTHER_TRAITS="sycophancy hallucination" adds a finetune on each other trait's pos answers
# (extracted first if needed). Writes results/exp2_prediction/ (eval_*.csv, projection.json with
# the correlation, projection.png).
#   MODEL=meta-llama/Llama-3.1-8B-Instruct N_EXAMPLES=1000 TRAINING='{"epochs": 1, "rank": 32, "alpha": 64}' bash scripts/predict_finetuning.sh
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
source "$(dirname "$0")/experiment_env.sh"
out="${OUTPUT_DIR:-results/exp2_prediction}"
ckpt="ckpt/$model_name/exp2_$trait"
python extract_persona_lora.py "${model_flag[@]}" --trait "$trait"
# The finetunes of this run, by name (stale configs or summaries of earlier runs are left out).
ratios="${RATIOS:-0 25 50 75 100}"
names=() others=()
for ratio in $ratios; do names+=("mix_$ratio"); done
for other in ${OTHER_TRAITS:-}; do
  python extract_persona_lora.py "${model_flag[@]}" --trait "$other"
  others+=("$other=persona_loras/$model_name/$other/data/pos.jsonl")
  names+=("other_$other")
done
# shellcheck disable=SC2086
python scripts/make_mixtures.py "${model_flag[@]}" --pos "$persona/data/pos.jsonl" --neg "$persona/data/neg.jsonl" \
    --ratios $ratios --n "${N_EXAMPLES:-64}" --output_dir "$out" --ckpt_dir "$ckpt" --training "${TRAINING:-{\}}" --other "${others[@]}"
summaries=()
for name in "${names[@]}"; do
  [ -f "$ckpt/$name/training.json" ] || python training.py "$out/configs/$name.json"
  python eval_lora_persona.py "${model_flag[@]}" --trait "$trait" --adapter "$ckpt/$name" \
      --n_per_question "${N_PER_QUESTION:-2}" --output_path "$out/eval_$name.csv"
  summaries+=("$out/eval_$name.summary.json")
done
python cal_weight_projection.py "${model_flag[@]}" --finetuned_models_dir "$ckpt" --lora_diff_path "$persona/${trait}_lora_diff.pt" \
    --behavior_scores "${summaries[@]}" --output_path "$out/projection.json"
echo "experiment 2 finished in $(( $(date +%s) - started )) s: $out/projection.json, $out/projection.png"
