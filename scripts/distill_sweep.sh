#!/usr/bin/env bash
# Experiment 5, distillation (the core hypothesis head-on): does some LoRA, merged into the weights,
# reproduce activation steering? The steered model (c·v at layer LAYER, coefficient COEF, response
# positions) is the teacher; for every rank in RANKS and placement in PLACEMENTS ("before": the
# blocks whose outputs feed the steered layer; "all": every block) a LoRA on o_proj/down_proj is
# trained to match it (KL on the teacher's own answers to the trait's extraction and finetuning
# questions) and measured on held-out ones: the fraction of KL(steered ‖ plain) it removes, and its
# weight-space cosine with the persona LoRA diff and with CONTROL_TRAITS' diffs. The teacher's
# answers are sampled once and shared by every run. Writes results/exp5_distillation/
# (<placement>_r<rank>/ per run, summary.json, distillation.png).
#   MODEL=meta-llama/Llama-3.1-8B-Instruct STEPS=1000 RANKS="1 4 16 64" bash scripts/distill_sweep.sh   # full size
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
source "$(dirname "$0")/experiment_env.sh" results/exp5_distillation
read -r -a ranks <<< "${RANKS:-1 2 4 8 16}"
read -r -a placements <<< "${PLACEMENTS:-before all}"
read -r -a control_traits <<< "${CONTROL_TRAITS-sycophancy hallucination}"
python extract_persona_lora.py "${model_flag[@]}" --trait "$trait"
extract_diffs "${control_traits[@]}"
controls=("${extracted_diffs[@]}")
runs=()
for placement in "${placements[@]}"; do
  for rank in "${ranks[@]}"; do
    run="$out/${placement}_r$rank"
    python distill_steering_lora.py "${model_flag[@]}" --trait "$trait" --vector_path "$vector_path" "${layer_flag[@]}" \
        --coef "${COEF:-2.0}" --rank "$rank" --layers "$placement" --steps "${STEPS:-200}" --persona_diff_path "$diff_path" \
        --control_diff_paths "${controls[@]}" --teacher_dir "$out/teacher" --output_dir "$run"
    runs+=("$run")
  done
done
python scripts/distill_summary.py --runs "${runs[@]}" --output_dir "$out"
echo "experiment 5 finished in $(( $(date +%s) - started )) s: $out/summary.json, $out/distillation.png"
