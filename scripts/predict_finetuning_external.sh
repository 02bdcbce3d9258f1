#!/usr/bin/env bash
# Experiment 2 on data nobody in this repository wrote (#20 item 3): finetune on CAA's public A/B
# items, and ask whether projecting each finetune onto the sycophancy persona diffs (the
# prompt-derived one and the one extracted from CAA's own sycophancy items) predicts its drift.
# The series (make_mixtures.py, every finetune with its own seed from its name, in
# mixtures.manifest.json): CAA sycophancy items answered the matching / non-matching way mixed at
# RATIOS percent (LoRA), the same at DENSE_RATIOS (dense, full checkpoints), each of CAA's six other
# behaviours answered the matching way, and MMLU's correct answers (benign): 5 + 2 + 6 + 1 = 14
# finetunes by default. Every item comes from the finetuning pool of make_external_finetuning_data.py:
# never an item the A/B diff trained on, never a held-out item that scores the finetunes, never a
# question any trait of dataset/ measures.
# Each finetune is measured on the public held-out items (the A/B extraction's ab_evaluation.jsonl),
# on dataset/sycophancy/ab.jsonl, and judged with the judge-free margin on the evaluation questions;
# projected onto both diffs against NULL_DRAWS random matched directions and NULL_TRAITS' diffs.
# Sized for 2 CPU cores: N_EXAMPLES=64 examples per finetune, one epoch (a public item with its
# answer runs to ~270 tokens, so one LoRA finetune of the 135M model is minutes, not hours, and the
# 14 finetunes with their three measurements fit an overnight run); every pool holds 236 items, so
# N_EXAMPLES may go up to 236 on a GPU.
# Writes results/exp2_external/ (finetune_data/, data/, configs/, eval_*, ab_*, public_ab_*,
# projection_public.json/.png: against the public held-out items, with the nulls; projection.json/.png:
# against the trait's own A/B items; both with the judged score and margin and the partial
# correlations; summary.json/.png: scripts/external_prediction.py over both).
#   MODEL=meta-llama/Llama-3.1-8B-Instruct N_EXAMPLES=236 TRAINING='{"epochs": 1, "rank": 32, "alpha": 64}' bash scripts/predict_finetuning_external.sh
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
TRAIT=sycophancy source "$(dirname "$0")/experiment_env.sh" results/exp2_external
ckpt="ckpt/$model_name/exp2_external"
read -r -a ratios <<< "${RATIOS:-0 25 50 75 100}"
read -r -a dense_ratios <<< "${DENSE_RATIOS:-0 100}"
read -r -a null_traits <<< "${NULL_TRAITS-evil hallucination corrigibility}"
n_examples="${N_EXAMPLES:-64}"

extract_diffs "$trait"
prompt_diff="${extracted_diffs[0]}"
# The null's other traits: each one's prompt-derived diff, and its A/B-derived one where it has a
# public set (a null for the A/B-derived sycophancy diff made the same way).
null_diffs=()
if [ "${#null_traits[@]}" -gt 0 ]; then extract_diffs "${null_traits[@]}"; null_diffs=("${extracted_diffs[@]}"); fi
for null_trait in "${null_traits[@]}"; do
  if [ -f "dataset/$null_trait/public_ab.json" ]; then extract_ab_diff "$null_trait"; null_diffs+=("$ab_diff"); fi
done
extract_ab_diff "$trait"   # last: it sets $ab_persona_dir and $ab_diff for the rest of the run

data="$out/finetune_data"
python scripts/make_external_finetuning_data.py --ab_extraction "$ab_persona_dir" --output_dir "$data" --n "$n_examples"
others=("benign=$data/mmlu/correct.jsonl")
for behaviour in hallucination corrigible-neutral-HHH survival-instinct power-seeking-inclination myopic-reward coordinate-other-ais; do
  others+=("$behaviour=$data/$behaviour/pos.jsonl")
done
python scripts/make_mixtures.py "${model_flag[@]}" --pos "$data/sycophancy/pos.jsonl" --neg "$data/sycophancy/neg.jsonl" \
    --ratios "${ratios[@]}" --dense_ratios "${dense_ratios[@]}" --other "${others[@]}" --n "$n_examples" \
    --output_dir "$out" --ckpt_dir "$ckpt" --training "${TRAINING:-{\}}" --dense_training "${DENSE_TRAINING:-{\}}"

# evaluate_model (experiment_env.sh) judges with the margin (eval_NAME) and scores dataset/sycophancy/ab.jsonl
# (ab_NAME); the public held-out items are scored beside them (public_ab_NAME).
evaluate_public() {
  local adapter_flag=()
  [ $# -gt 1 ] && adapter_flag=(--adapter "$2")
  python eval_lora_persona.py "${model_flag[@]}" --trait "$trait" --ab_data "$ab_persona_dir/ab_evaluation.jsonl" "${adapter_flag[@]}" \
      --output_path "$out/public_ab_$1.csv"
}
evaluate_model base
evaluate_public base
mapfile -t names < "$out/runs.txt"   # this run's finetunes only
finetunes=() judged=() own_ab=() public_ab=()
for name in "${names[@]}"; do
  python training.py "$out/configs/$name.json"   # reuses a finetune only if its config and data are unchanged
  evaluate_model "$name" "$ckpt/$name"
  evaluate_public "$name" "$ckpt/$name"
  finetunes+=("$ckpt/$name") judged+=("$out/eval_$name.summary.json")
  own_ab+=("$out/ab_$name.summary.json") public_ab+=("$out/public_ab_$name.summary.json")
done
# One projection per A/B test set: a projection run pools the A/B summaries of one file only. The
# nulls are the same for both (same finetunes, diffs and draws), so the public run computes them:
# NULL_DRAWS random matched directions (2,000: a Monte Carlo p is at least 1/(N+1), and the
# summary's Holm family holds ~50 tests) and NULL_TRAITS' diffs.
null_flags=(--null_draws "${NULL_DRAWS:-2000}")
[ "${#null_diffs[@]}" -gt 0 ] && null_flags+=(--null_diffs "${null_diffs[@]}")
python cal_weight_projection.py "${model_flag[@]/--model/--original_model}" --finetuned_model "${finetunes[@]}" \
    --lora_diff_path "$prompt_diff" "$ab_diff" "${null_flags[@]}" --behavior_scores "${judged[@]}" "${public_ab[@]}" \
    --output_path "$out/projection_public.json"
python cal_weight_projection.py "${model_flag[@]/--model/--original_model}" --finetuned_model "${finetunes[@]}" \
    --lora_diff_path "$prompt_diff" "$ab_diff" --behavior_scores "${judged[@]}" "${own_ab[@]}" --output_path "$out/projection.json"
# One table and one Holm family over both runs, the held-out change clustered by question stem.
python scripts/external_prediction.py --output_dir "$out"
echo "experiment 2 on external data finished in $(( $(date +%s) - started )) s: $out/summary.json, $out/summary.png"
