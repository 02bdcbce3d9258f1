"""Experiment 5, distillation: the summary of the runs of scripts/distill_sweep.sh, the command
line of eval/experiments/distillation.py.

    python scripts/distill_summary.py --output_dir results/exp5_distillation \\
        --runs results/exp5_distillation/before_r1 results/exp5_distillation/all_r1 ...

Reads each run's summary.json and distilled diff (distill_steering_lora.py, all distilling the same
steered teacher) and writes, under --output_dir:
    summary.json      per placement (the runs' --layers) and rank: the fraction of the held-out
                      KL(steered ‖ plain) that the distilled LoRA removes, the smallest rank reaching
                      --target, the weight-space cosine with the persona diff and with each control diff,
                      the cosine of each rank's update with the largest rank's (is the direction stable?),
                      and the functional comparison: the residual-stream change the distilled LoRA, the
                      steering and the persona LoRA each cause at the steered layer on the held-out
                      answers, pair by pair, with the per-module cosines with the persona diff
    distillation.png  fraction reproduced against rank, one line per placement; the cosines against rank
    summary.manifest.json
"""

import time


from eval.experiments.distillation import load_runs, plot, print_summary, summarize
from io_utils import ArgumentParser, check_writable_dir, run_cli, unit_interval, write_json, write_manifest


def main():
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--runs", nargs="+", required=True, help="output folders of distill_steering_lora.py, one teacher")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--target", type=unit_interval, default=0.9, help="the fraction reproduced that 'reaching' means")
    args = parser.parse_args()
    started = time.time()
    output_dir = check_writable_dir(args.output_dir, "--output_dir")
    report = summarize(load_runs(args.runs), args.target)
    write_json(output_dir / "summary.json", report)
    plot(report, output_dir / "distillation.png")
    write_manifest(output_dir, args, started, name="summary.manifest.json", outputs={"summary": str(output_dir / "summary.json"),
                                                                                    "plot": str(output_dir / "distillation.png")})
    print_summary(report)
    print(f"\nwrote {output_dir / 'summary.json'} and {output_dir / 'distillation.png'}")


if __name__ == "__main__":
    run_cli(main)
