#!/usr/bin/env bash
# Sourced by the demo and the experiment drivers after setup_env.sh: the trait, the model flag, the
# layer flag, and where the stages write for them (asked of Python, so the layout lives in
# model_loading.py only): $persona_dir, $diff_path, $vector_path, $judge_data_dir,
# $finetune_data_dir, $model_name; and extract_diffs, for drivers that need several traits' diffs.
# TRAIT, MODEL and LAYER come from the environment.
trait="${TRAIT:-evil}"
model_flag=()
[ -n "${MODEL:-}" ] && model_flag=(--model "$MODEL")
layer_flag=()   # no LAYER: the Python side steers at two thirds of the depth (layer 20 of the embedded model's 30)
[ -n "${LAYER:-}" ] && layer_flag=(--layer "$LAYER")
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
