#!/usr/bin/env bash
# Two sources, one direction? For each linked trait (dataset/<trait>/public_ab.json), the persona
# diff extracted from the trait's prompts and the one extracted from its public A/B set (CAA's
# items) are cross-evaluated, both at 0 and +1 in one run per test set: on the public set's
# held-out items, on the trait's own A/B items and on its judged evaluation questions with the
# judge-free margin; then compared by what they do on held-out inputs (data-weighted cosine against
# random matched diffs and other traits' diffs; residual-stream change at the steered layer).
# Writes results/cross_source/ (public_ab_T, own_ab_T, judged_T runs, similarity_T.json,
# summary.json, cross_source.png).
#   TRAITS="sycophancy" AB_MAX_ITEMS=64 N_PER_QUESTION=2 NULL_DRAWS=1000 COMPARATORS="evil" bash scripts/cross_source.sh
# The comparators default to the linked traits themselves (each trait's prompt-derived and, where it
# has a public set, A/B-derived diffs set beside the others').
# 1,000 null draws: a Monte Carlo p is at least 1/(N + 1), and Holm multiplies the smallest of the
# table's ~30 tests by ~30, so 100 draws (floor 0.0099 → 0.3) could never show a null test significant.
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
source "$(dirname "$0")/experiment_env.sh" results/cross_source
read -r -a traits <<< "${TRAITS:-sycophancy hallucination corrigibility}"
read -r -a comparator_traits <<< "${COMPARATORS:-${traits[*]}}"
mkdir -p "$out"
extract_diffs "${comparator_traits[@]}"
comparator_diffs=("${extracted_diffs[@]}")
# and each comparator's A/B-derived diff where it has a public set: another trait's diff made the
# same way as the A/B-derived one (it learns the same answer format), the null that format shares.
for c in "${comparator_traits[@]}"; do
  if [ -f "dataset/$c/public_ab.json" ]; then extract_ab_diff "$c"; comparator_diffs+=("$ab_diff"); fi
done
for t in "${traits[@]}"; do
  extract_diffs "$t"
  prompt_diff="${extracted_diffs[0]}"
  extract_ab_diff "$t"
  both=(--lora_diff_path "$prompt_diff" "$ab_diff" --lora_coef 0 0 1 0 0 1)
  python eval_lora_persona.py "${model_flag[@]}" --trait "$t" --ab_data "$ab_persona_dir/ab_evaluation.jsonl" "${both[@]}" \
      --output_path "$out/public_ab_$t.csv"
  python eval_lora_persona.py "${model_flag[@]}" --trait "$t" --ab_data "dataset/$t/ab.jsonl" "${both[@]}" \
      --output_path "$out/own_ab_$t.csv"
  python eval_lora_persona.py "${model_flag[@]}" --trait "$t" "${both[@]}" --n_per_question "${N_PER_QUESTION:-2}" \
      --output_path "$out/judged_$t.csv"
  others=()
  for c in "${comparator_diffs[@]}"; do [ "$c" != "$prompt_diff" ] && [ "$c" != "$ab_diff" ] && others+=("$c"); done
  python scripts/cross_source.py similarity "${model_flag[@]}" "${layer_flag[@]}" --trait "$t" --prompt_diff "$prompt_diff" \
      --ab_diff "$ab_diff" --comparators "${others[@]}" --ab_items "$ab_persona_dir/ab_evaluation.jsonl" \
      --answers "$out/judged_$t.csv" --null_draws "${NULL_DRAWS:-1000}" --output "$out/similarity_$t.json"
done
python scripts/cross_source.py summarize --output_dir "$out" --traits "${traits[@]}"
echo "cross-source finished in $(( $(date +%s) - started )) s: $out/summary.json, $out/cross_source.png"
