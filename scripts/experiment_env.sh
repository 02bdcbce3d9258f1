#!/usr/bin/env bash
# Sourced by the demo and the experiment drivers after setup_env.sh: the trait, the model flag, and
# where the stages write for them (asked of Python, so the layout lives in model_loading.py only):
# $persona_dir, $diff_path, $vector_path, $judge_data_dir, $finetune_data_dir, $model_name; and
# extract_diffs, for drivers that need several traits' diffs.
# TRAIT and MODEL come from the environment.
trait="${TRAIT:-evil}"
model_flag=()
[ -n "${MODEL:-}" ] && model_flag=(--model "$MODEL")
eval "$(python scripts/persona_paths.py "${model_flag[@]}" --trait "$trait")"
started=$(date +%s)

# extract_diffs ARRAY TRAIT...: extract each trait (a finished extraction is reused) and append its
# persona diff's path to the array named ARRAY.
extract_diffs() {
  local -n into=$1
  shift
  local t
  for t in "$@"; do
    python extract_persona_lora.py "${model_flag[@]}" --trait "$t"
    eval "$(python scripts/persona_paths.py "${model_flag[@]}" --trait "$t" --prefix extracted_)"
    into+=("$extracted_diff_path")
  done
}
