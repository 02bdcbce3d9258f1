"""Experiment 2 on external data: finetuning sets from CAA's public A/B items and MMLU
(the logic and its rules are in eval/external_finetuning.py).

    python scripts/make_external_finetuning_data.py --ab_extraction persona_loras/<model>/sycophancy_caa \\
        --output_dir results/exp2_external/finetune_data --n 64

Writes <output_dir>/sycophancy/{pos,neg}.jsonl (each item answered the matching and the
non-matching way), <output_dir>/<behaviour>/pos.jsonl for each of --behaviours (matching answers),
<output_dir>/mmlu/correct.jsonl (the correct answers) and external_finetuning.manifest.json (every
example's behaviour, item index and side; each set's pool and what was left out of it). No model
is loaded: every refusal (a missing or unsplit --ab_extraction, --n beyond a pool, an unknown
behaviour) comes before anything is written.
"""

import time
from pathlib import Path

from eval.external_finetuning import OTHER_BEHAVIOURS, build_sets
from io_utils import ArgumentParser, check_writable_dir, non_negative_int, positive_int, run_cli, write_jsonl, write_manifest


def main():
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--ab_extraction", required=True,
                        help="the --output_dir of extract_persona_lora.py --trait sycophancy --ab_source public (its recorded split)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--n", type=positive_int, default=64, help="examples per set")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--behaviours", nargs="*", default=list(OTHER_BEHAVIOURS), help="CAA's other behaviours to answer the matching way")
    parser.add_argument("--ab_max_items", type=non_negative_int, default=None,
                        help="the other behaviours' pool starts beyond this many extraction items (default: as many as the "
                             "sycophancy A/B extraction used), so their later A/B extractions with this cap stay disjoint")
    parser.add_argument("--no_benign", action="store_true", help="skip the MMLU set")
    args = parser.parse_args()
    started = time.time()
    sets, report = build_sets(args.ab_extraction, args.n, args.seed, args.behaviours, args.ab_max_items, not args.no_benign)
    output_dir = check_writable_dir(args.output_dir, "--output_dir")
    for name, sides in sets.items():
        for side, records in sides.items():
            write_jsonl(Path(output_dir) / name / f"{side}.jsonl", records)
    write_manifest(output_dir, args, started, name="external_finetuning.manifest.json", sets=report)
    print(f"wrote {', '.join(f'{name} ({len(next(iter(sides.values())))} × {len(sides)} sides)' for name, sides in sets.items())} "
          f"to {output_dir}")


if __name__ == "__main__":
    run_cli(main)
