#!/usr/bin/env bash
# Experiment 2, finetuning prediction (Persona Vectors' Figure 6 in weight space): finetune on
# datasets whose trait content varies, judge each finetune's trait score and its judge-free margin,
# project each finetune's weight change onto the persona diff, and report the correlations with
# permutation p-values (the seed expects r > 0.7) and the scatter.
# The finetuning data are fresh answers to the trait's finetuning questions (never the extraction's);
# every finetune trains with its own seed, derived from its name (its initialisation, from the
# finetune seed stream and never the persona adapters', and its data order; recorded in
# mixtures.manifest.json). The series: trait / anti-trait mixtures at RATIOS percent (LoRA), the same
# data trained again (a replicate, its own seed) at RESEED_RATIOS, dense finetunes (full checkpoints)
# at DENSE_RATIOS, the model's own unprompted answers (benign), and each of OTHER_TRAITS' trait answers.
# Each finetune is measured three ways: judged, by the judge-free margin, and by forced choice (A/B).
# Writes results/exp2_prediction/ (eval_*.csv, ab_*.csv, projection.json with the correlations, projection.png).
#   MODEL=meta-llama/Llama-3.1-8B-Instruct N_EXAMPLES=1000 TRAINING='{"epochs": 1, "rank": 32, "alpha": 64}' bash scripts/predict_finetuning.sh
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
source "$(dirname "$0")/experiment_env.sh" results/exp2_prediction
ckpt="ckpt/$model_name/exp2_$trait"
read -r -a ratios <<< "${RATIOS:-0 25 50 75 100}"
read -r -a reseed_ratios <<< "${RESEED_RATIOS:-0 100}"
read -r -a dense_ratios <<< "${DENSE_RATIOS:-0 50 100}"
read -r -a other_traits <<< "${OTHER_TRAITS-sycophancy hallucination corrigibility}"
python extract_persona_lora.py "${model_flag[@]}" --trait "$trait"
python scripts/make_finetuning_data.py "${model_flag[@]}" --trait "$trait" --sides pos neg plain
others=("benign=$finetune_data_dir/plain.jsonl")
for other in "${other_traits[@]}"; do
  eval "$(python scripts/persona_paths.py "${model_flag[@]}" --trait "$other" --prefix other_)"
  python scripts/make_finetuning_data.py "${model_flag[@]}" --trait "$other" --sides pos
  others+=("$other=$other_finetune_data_dir/pos.jsonl")
done
python scripts/make_mixtures.py "${model_flag[@]}" --pos "$finetune_data_dir/pos.jsonl" --neg "$finetune_data_dir/neg.jsonl" \
    --ratios "${ratios[@]}" --reseed_ratios "${reseed_ratios[@]}" --dense_ratios "${dense_ratios[@]}" --other "${others[@]}" \
    --n "${N_EXAMPLES:-64}" --extraction_data "$persona_dir/data" --output_dir "$out" --ckpt_dir "$ckpt" \
    --training "${TRAINING:-{\}}" --dense_training "${DENSE_TRAINING:-{\}}"
evaluate_model base
mapfile -t names < "$out/runs.txt"   # this run's finetunes only: stale configs of earlier runs are left out
finetunes=() summaries=()
for name in "${names[@]}"; do
  python training.py "$out/configs/$name.json"   # reuses a finetune only if its config and data are unchanged
  evaluate_model "$name" "$ckpt/$name"
  finetunes+=("$ckpt/$name") summaries+=("$out/eval_$name.summary.json" "$out/ab_$name.summary.json")
done
python cal_weight_projection.py "${model_flag[@]/--model/--original_model}" --finetuned_model "${finetunes[@]}" \
    --lora_diff_path "$diff_path" --behavior_scores "${summaries[@]}" --output_path "$out/projection.json"
echo "experiment 2 finished in $(( $(date +%s) - started )) s: $out/projection.json, $out/projection.png"
