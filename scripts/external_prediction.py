"""The summary of Experiment 2 on external data (the command line of
eval/experiments/external_prediction.py), run by scripts/predict_finetuning_external.sh at its end:

    python scripts/external_prediction.py --output_dir results/exp2_external

Reads the driver's two projection runs (projection_public.json, projection.json) and the public
held-out items' summaries (public_ab_base, public_ab_<finetune>), and writes summary.json (one
row per finetune, every test of the experiment with Holm over them all, the held-out change
clustered by question stem and per item group), summary.png (each finetune's null z against its
held-out change, per diff) and summary.manifest.json.
"""

import time

from io_utils import ArgumentParser, check_writable_dir, run_cli, write_json, write_manifest


def main():
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--output_dir", required=True, help="the driver's output folder (results/exp2_external)")
    args = parser.parse_args()
    from eval.experiments.external_prediction import plot_report, print_report, summarize

    started = time.time()
    output_dir = check_writable_dir(args.output_dir, "--output_dir")
    report = summarize(output_dir)
    write_json(output_dir / "summary.json", report)
    plot_report(report, output_dir / "summary.png")
    write_manifest(output_dir, args, started, name="summary.manifest.json", outputs={"summary": str(output_dir / "summary.json")})
    print_report(report)
    print(f"wrote {output_dir / 'summary.json'}, {output_dir / 'summary.png'}")


if __name__ == "__main__":
    run_cli(main)
