"""The projection null of several finetunes: each module's random draws generated once for all of
them (lora_utils.project_finetunes_null, what cal_weight_projection.py runs) against one finetune
at a time (project_finetune_null per finetune, which regenerates the same draws for each).

    python bench/bench_null.py --original_model M --finetuned_model F1 F2 ... --lora_diff_path D1 [D2] [--draws 200]

Both ways in one run on the same finetunes and draws; prints the seconds of each, their ratio and
the largest difference between the two ways' null projections (they must agree: same draws).
"""

import argparse
import time
from pathlib import Path

import lora_utils as lu
from model_loading import resolve_model_folder


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original_model", default=None)
    parser.add_argument("--finetuned_model", nargs="+", required=True)
    parser.add_argument("--lora_diff_path", nargs="+", required=True)
    parser.add_argument("--draws", type=int, default=200)
    args = parser.parse_args()
    original = lu.SafetensorsCheckpoint(resolve_model_folder(args.original_model))
    diffs = {f"{Path(p).parent.name}/{Path(p).stem}": lu.load_lora_diff(p) for p in args.lora_diff_path}

    started = time.perf_counter()
    alone = [lu.project_finetune_null(original, folder, diffs, {}, args.draws) for folder in args.finetuned_model]
    one_at_a_time = time.perf_counter() - started
    started = time.perf_counter()
    together = lu.project_finetunes_null(original, args.finetuned_model, diffs, {}, args.draws)
    batched = time.perf_counter() - started

    largest = max(abs(a - b) / max(abs(a), 1e-12) for x, y in zip(alone, together) for label in diffs
                  for a, b in zip(x[label]["null_draws"], y[label]["null_draws"]))
    print(f"{len(args.finetuned_model)} finetunes × {len(diffs)} diffs × {args.draws} draws: one at a time {one_at_a_time:.1f} s, "
          f"draws shared {batched:.1f} s, speed-up {one_at_a_time / batched:.2f}×; largest relative difference {largest:.1e}")


if __name__ == "__main__":
    main()
