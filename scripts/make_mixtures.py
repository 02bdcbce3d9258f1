"""Experiment 2's finetuning series: datasets whose trait content varies, and a training config
for each.

    python scripts/make_mixtures.py --pos F/pos.jsonl --neg F/neg.jsonl --ratios 0 25 50 75 100 \\
        --dense_ratios 0 50 100 --reseed_ratios 0 100 --other sycophancy=G/pos.jsonl benign=F/plain.jsonl \\
        --n 64 --extraction_data persona_loras/<model>/evil/data --output_dir results/exp2_prediction --ckpt_dir ckpt/exp2

The series is eval/mixtures.py's: mix_<r>.jsonl holds r % trait answers (pos) and the rest
anti-trait answers (neg), drawn without replacement with --seed, and no question in it is answered
both ways (a question's answers all come from one side); prompts and demonstrations are dropped (training never sees them).
--pos/--neg are finetuning data (scripts/make_finetuning_data.py: the trait's finetuning questions),
never the extraction's answers: with --extraction_data, a dataset holding a question of the
extraction is refused. Each finetune gets a config:
    mix_<r>               a LoRA finetune (initialisation from the finetune seed stream, never the persona adapters')
    mix_<r>_replicate     --reseed_ratios: the same data as mix_<r>, trained again (its own seed)
    dense_mix_<r>         --dense_ratios: a dense finetune of the target modules (a full checkpoint)
    other_<NAME>          --other NAME=FILE: --n answers drawn from FILE (another trait, benign data)
Every finetune trains with its own seed (initialisation and data order), derived from its name and
--seed (trainer.run_seed): no two finetunes of the series share a lora_A or a data order, and a rerun
gives each the same seed again. runs.txt lists this run's finetunes, one per line, for the driver;
mixtures.manifest.json records each one's seed.
"""

import json
import time
from pathlib import Path

from eval.generation import read_chat_jsonl
from eval.mixtures import DENSE_TRAINING, LORA_TRAINING, refuse_forbidden_questions, series
from eval.traits import measured_questions, normalize_question
from io_utils import (
    ArgumentParser,
    PersonaLoRAError,
    atomic_path,
    non_negative_int,
    positive_int,
    read_jsonl,
    run_cli,
    write_json,
    write_jsonl,
    write_manifest,
)
from trainer import question_of


def parse_json(parser, text: str, flag: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        parser.error(f"{flag} is not valid JSON ({error.msg})")
    if not isinstance(value, dict):
        parser.error(f"{flag} must be a JSON object of training.py config keys")
    return value


def main():
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--pos", required=True, help="trait answers to the finetuning questions")
    parser.add_argument("--neg", required=True, help="anti-trait answers to the finetuning questions")
    parser.add_argument("--ratios", nargs="+", type=non_negative_int, default=[0, 25, 50, 75, 100])
    parser.add_argument("--dense_ratios", nargs="*", type=non_negative_int, default=[])
    parser.add_argument("--reseed_ratios", nargs="*", type=non_negative_int, default=[])
    parser.add_argument("--n", type=positive_int, default=64, help="examples per dataset")
    parser.add_argument("--model", default=None)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--ckpt_dir", required=True)
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--training", default="{}", help='JSON of training.py config keys for the LoRA finetunes, e.g. \'{"epochs": 2}\'')
    parser.add_argument("--dense_training", default="{}", help="the same for the dense finetunes")
    parser.add_argument("--other", nargs="*", default=[], metavar="NAME=FILE",
                        help="more datasets, e.g. sycophancy=persona_loras/<model>/sycophancy/finetune_data/pos.jsonl")
    parser.add_argument("--extraction_data", default=None,
                        help="the persona's extraction data folder: refuse any finetuning example on one of its questions")
    args = parser.parse_args()
    started = time.time()
    bad = [r for r in [*args.ratios, *args.dense_ratios, *args.reseed_ratios] if r > 100]
    if bad:
        parser.error(f"ratio {bad[0]} is not a percentage")
    lora_training = {**LORA_TRAINING, **parse_json(parser, args.training, "--training")}
    dense_training = {**DENSE_TRAINING, **parse_json(parser, args.dense_training, "--dense_training")}
    if "seed" in lora_training or "seed" in dense_training:
        parser.error("every finetune gets its own seed from its name and --seed: set --seed, not a 'seed' training key")
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

    runs, seeds = series(pos, neg, others, args.n, args.seed, args.ratios, args.reseed_ratios, args.dense_ratios,
                         lora_training, dense_training)
    # No finetune trains on a question that measures anything (any trait's evaluation, judge or A/B
    # questions), nor on one the persona adapters were trained on.
    forbidden = measured_questions()
    if args.extraction_data:
        forbidden.update({normalize_question(question_of(r)): "the extraction's questions"
                          for side in ("pos", "neg") for r in read_jsonl(Path(args.extraction_data) / f"{side}.jsonl")})
    refuse_forbidden_questions(runs, forbidden)
    output_dir = Path(args.output_dir)
    for name, (records, training) in runs.items():
        records = [{"messages": [m for m in r["messages"] if m["role"] != "system"]} for r in records]
        data_path = output_dir / "data" / f"{name}.jsonl"
        write_jsonl(data_path, records)
        write_json(output_dir / "configs" / f"{name}.json",
                   {"model": args.model, "training_file": str(data_path), "output_dir": f"{args.ckpt_dir}/{name}", **training,
                    "seed": seeds[name]})
    with atomic_path(output_dir / "runs.txt") as tmp:
        tmp.write_text("".join(f"{name}\n" for name in runs))
    write_manifest(output_dir, args, started, name="mixtures.manifest.json", seeds=seeds,
                   seed_rule="trainer.run_seed(name, --seed): each finetune's training seed (initialisation and data order)")
    print(f"wrote {len(runs)} datasets of {args.n} examples and their configs to {output_dir} ({', '.join(runs)})")


if __name__ == "__main__":
    run_cli(main)
