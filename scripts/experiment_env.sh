#!/usr/bin/env bash
# Sourced by the demo and the experiment drivers after setup_env.sh, with the driver's default
# output folder as its argument (none for the demo): the trait, the model flag, the layer flag, the
# output folder $out, and where the stages write for the trait (asked of Python, so the layout
# lives in model_loading.py only): $persona_dir, $diff_path, $vector_path, $judge_data_dir,
# $finetune_data_dir, $model_name. Then the helpers extract_diffs and evaluate_model.
# TRAIT, MODEL, LAYER and OUTPUT_DIR come from the environment.
trait="${TRAIT:-evil}"
model_flag=()
[ -n "${MODEL:-}" ] && model_flag=(--model "$MODEL")
layer_flag=()   # no LAYER: the Python side steers at two thirds of the depth (layer 20 of the embedded model's 30)
[ -n "${LAYER:-}" ] && layer_flag=(--layer "$LAYER")
out="${OUTPUT_DIR:-${1:-}}"
eval "$(python scripts/persona_paths.py "${model_flag[@]}" --trait "$trait")"
started=$(date +%s)

# extract_diffs TRAIT...: extract each trait (a finished extraction is reused) and set the array
# extracted_diffs to their persona diffs' paths, in order.
extract_diffs() {
  extracted_diffs=()
  local t
  for t in "$@"; do
    python extract_persona_lora.py "${model_flag[@]}" --trait "$t"
    eval "$(python scripts/persona_paths.py "${model_flag[@]}" --trait "$t" --prefix extracted_)"
    extracted_diffs+=("$extracted_diff_path")
  done
}

# extract_ab_diff TRAIT: extract TRAIT's persona diff from its public A/B set (dataset/TRAIT/public_ab.json;
# AB_MAX_ITEMS items, 64 by default) into persona_loras/<model>/TRAIT_caa/ (a finished one is reused), and
# set $ab_persona_dir (its held-out items: $ab_persona_dir/ab_evaluation.jsonl) and $ab_diff.
extract_ab_diff() {
  eval "$(python scripts/persona_paths.py "${model_flag[@]}" --trait "${1}_caa" --prefix ab_)"
  python extract_persona_lora.py "${model_flag[@]}" --trait "$1" --ab_source public --ab_max_items "${AB_MAX_ITEMS:-64}" \
      --output_dir "$ab_persona_dir" --vector_output_path "$ab_vector_path"
  ab_diff="$ab_persona_dir/${1}_lora_diff.pt"
}

# evaluate_model NAME [ADAPTER]: the base model (or the finetune ADAPTER) on the trait's held-out
# questions, judged with the judge-free margin ($out/eval_NAME.csv), and on its A/B set
# ($out/ab_NAME.csv).
evaluate_model() {
  local adapter_flag=()
  [ $# -gt 1 ] && adapter_flag=(--adapter "$2")
  python eval_lora_persona.py "${model_flag[@]}" --trait "$trait" --n_per_question "${N_PER_QUESTION:-2}" "${adapter_flag[@]}" \
      --output_path "$out/eval_$1.csv"
  python eval_lora_persona.py "${model_flag[@]}" --trait "$trait" --ab_data "dataset/$trait/ab.jsonl" "${adapter_flag[@]}" \
      --output_path "$out/ab_$1.csv"
}
