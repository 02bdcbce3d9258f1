"""The summary of scripts/ab_fewshot.sh, the command line of eval/experiments/ab_fewshot.py: per
trait and extraction setting (few-shot K), the A/B balanced p_matching of the persona LoRA and of
the vector at every coefficient (with its change against coefficient 0, paired by item), their A/B
and margin slopes, the difference between the settings' A/B slopes, paired by item, the two methods
in calibrated units, and the default setting's vector steered at every position (when the driver
swept it); every p with Holm's adjustment over all of them beside it, and the unsteered model's
log(P(m) + P(n)). Writes summary.json, table.md (the README's tables) and ab.png.

    python scripts/ab_summary.py --traits evil sycophancy --fewshot 4 0 --output_dir results/exp6_ab
"""

from pathlib import Path


from eval.experiments.ab_fewshot import coefficients_of, collect, plot, table
from io_utils import ArgumentParser, atomic_path, non_negative_int, run_cli, write_json


def main():
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--traits", nargs="+", required=True)
    parser.add_argument("--fewshot", nargs="+", type=non_negative_int, required=True, help="the settings compared, the default first")
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args()
    report = collect(args.output_dir, args.traits, args.fewshot, args.model)
    output_dir = Path(args.output_dir)
    write_json(output_dir / "summary.json", report)
    markdown = table(report, coefficients_of(report))
    with atomic_path(output_dir / "table.md") as tmp:
        tmp.write_text(markdown)
    plot(report, output_dir / "ab.png")
    print(markdown)


if __name__ == "__main__":
    run_cli(main)
