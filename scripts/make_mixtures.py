"""Experiment 2's finetuning series: datasets whose trait content varies, and a training config
for each.

    python scripts/make_mixtures.py --pos D/data/pos.jsonl --neg D/data/neg.jsonl --ratios 0 25 50 75 100 \\
        --n 64 --output_dir results/exp2_prediction --ckpt_dir ckpt/exp2

mix_<r>.jsonl holds r % trait answers (pos) and the rest anti-trait answers (neg), drawn without
replacement with --seed; the persona system prompts are dropped (training never sees them).
configs/mix_<r>.json trains a LoRA on it with training.py. Each --other NAME=FILE adds a dataset
of --n answers drawn from FILE (e.g. another trait's pos.jsonl) as other_<NAME>.
"""

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.generation import read_chat_jsonl  # noqa: E402
from io_utils import (  # noqa: E402
    PersonaLoRAError,
    run_cli,
    write_json,
    write_jsonl,  # noqa: E402
)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pos", required=True)
    parser.add_argument("--neg", required=True)
    parser.add_argument("--ratios", nargs="+", type=int, default=[0, 25, 50, 75, 100])
    parser.add_argument("--n", type=int, default=64, help="examples per dataset")
    parser.add_argument("--model", default=None)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--ckpt_dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--training", default="{}", help='JSON of training.py config keys to set, e.g. \'{"epochs": 2}\'')
    parser.add_argument("--other", nargs="*", default=[], metavar="NAME=FILE",
                        help="more datasets, e.g. sycophancy=persona_loras/<model>/sycophancy/data/pos.jsonl")
    args = parser.parse_args()
    others = {}
    for item in args.other:
        name, _, path = item.partition("=")
        if not name or not path:
            parser.error(f"--other {item!r} is not NAME=FILE")
        others[name] = read_chat_jsonl(path)
        if args.n > len(others[name]):
            raise PersonaLoRAError(f"--n {args.n} is more than the {len(others[name])} answers in {path}")
    pos, neg = read_chat_jsonl(args.pos), read_chat_jsonl(args.neg)
    if args.n > min(len(pos), len(neg)):
        raise PersonaLoRAError(f"--n {args.n} is more than the {min(len(pos), len(neg))} answers per side available")
    bad = [r for r in args.ratios if not 0 <= r <= 100]
    if bad:
        raise PersonaLoRAError(f"--ratios {bad[0]} is not a percentage")
    output_dir = Path(args.output_dir)
    training = {"rank": 8, "alpha": 16, "epochs": 1, "learning_rate": 5e-4, "batch_size": 8, "max_length": 256,
                "seed": args.seed, **json.loads(args.training)}
    datasets = {}
    for ratio in args.ratios:
        rng = random.Random(args.seed + ratio)
        n_pos = round(args.n * ratio / 100)
        datasets[f"mix_{ratio}"] = rng.sample(pos, n_pos) + rng.sample(neg, args.n - n_pos)
        rng.shuffle(datasets[f"mix_{ratio}"])
    for name, records in others.items():
        datasets[f"other_{name}"] = random.Random(args.seed).sample(records, args.n)
    for name, records in datasets.items():
        records = [{"messages": [m for m in r["messages"] if m["role"] != "system"]} for r in records]
        data_path = output_dir / "data" / f"{name}.jsonl"
        write_jsonl(data_path, records)
        write_json(output_dir / "configs" / f"{name}.json",
                      {"model": args.model, "training_file": str(data_path), "output_dir": f"{args.ckpt_dir}/{name}", **training})
    print(f"wrote {len(datasets)} datasets of {args.n} examples and their configs to {output_dir}")


if __name__ == "__main__":
    run_cli(main)
