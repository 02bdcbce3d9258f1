"""Experiment 2's finetuning series (the library side of scripts/make_mixtures.py): datasets whose
trait content varies, each with its training settings and its own seed.

    mix_<r>            r % trait answers (pos), the rest anti-trait answers (neg); LoRA
    mix_<r>_replicate  the same data as mix_<r>, trained again with its own seed
    dense_mix_<r>      the same data, a dense finetune of the target modules
    other_<NAME>       n answers drawn from another file (another trait, benign data)

A mixture never answers a question both ways: drawing the two sides independently answered 10-14
questions both ways in the 25/50/75 % sets of the external series, which cancels those pairs and
bends the effective trait share towards 0/100 (an S-shape the partial correlation on the nominal
fraction does not remove). So questions are dealt in a seeded order, to the trait side until it
holds its share, then to the other, and all of a question's answers come from its side.
"""

from __future__ import annotations

import random

from eval.traits import normalize_question
from io_utils import PersonaLoRAError
from trainer import question_of, run_seed

LORA_TRAINING = {"method": "lora", "rank": 8, "alpha": 16, "epochs": 1, "learning_rate": 5e-4, "batch_size": 8, "max_length": 256}
DENSE_TRAINING = {"method": "dense", "epochs": 1, "learning_rate": 2e-5, "batch_size": 8, "max_length": 256, "dtype": "float32"}


def group_by_question(records: list[dict]) -> dict[str, list[dict]]:
    """{normalised question: its records}, in first-appearance order."""
    grouped: dict[str, list[dict]] = {}
    for record in records:
        grouped.setdefault(normalize_question(question_of(record)), []).append(record)
    return grouped


def mixture(pos: list[dict], neg: list[dict], n: int, ratio: int, seed: int) -> list[dict]:
    """n records, round(n·ratio/100) of them from pos, no question on both sides (see above)."""
    pos_by_question, neg_by_question = group_by_question(pos), group_by_question(neg)
    shared_questions = [q for q in pos_by_question if q in neg_by_question]
    rng = random.Random(seed * 1000 + ratio)
    n_pos = round(n * ratio / 100)
    order = list(shared_questions)
    rng.shuffle(order)
    records, questions_left = {"pos": [], "neg": []}, iter(order)
    for side, wanted, source in (("pos", n_pos, pos_by_question), ("neg", n - n_pos, neg_by_question)):
        while len(records[side]) < wanted:
            question = next(questions_left, None)
            if question is None:
                raise PersonaLoRAError(f"--n {n} at {ratio} % needs more questions than the {len(shared_questions)} that "
                                       "--pos and --neg both answer (each question's answers go to one side only): lower --n")
            answers = source[question]
            records[side] += rng.sample(answers, min(len(answers), wanted - len(records[side])))
    mixed = records["pos"] + records["neg"]
    rng.shuffle(mixed)
    return mixed


def series(pos: list[dict], neg: list[dict], others: dict[str, list[dict]], n: int, seed: int, ratios, reseed_ratios,
           dense_ratios, lora_training: dict, dense_training: dict) -> tuple[dict[str, tuple[list[dict], dict]], dict[str, int]]:
    """({name: (records, training settings)}, {name: its seed}): every finetune gets its own seed
    from its name and `seed` (trainer.run_seed), so no two share a lora_A or a data order."""
    runs = {}
    for ratio in ratios:
        runs[f"mix_{ratio}"] = (mixture(pos, neg, n, ratio, seed), lora_training)
    for ratio in reseed_ratios:
        runs[f"mix_{ratio}_replicate"] = (mixture(pos, neg, n, ratio, seed), lora_training)
    for ratio in dense_ratios:
        runs[f"dense_mix_{ratio}"] = (mixture(pos, neg, n, ratio, seed), dense_training)
    for name, records in others.items():
        runs[f"other_{name}"] = (random.Random(seed).sample(records, n), lora_training)
    return runs, {name: run_seed(name, seed) for name in runs}


def refuse_forbidden_questions(runs: dict, forbidden: dict[str, str]) -> None:
    """No finetune trains on a question that measures anything or that the persona adapters saw
    (`forbidden`: {normalised question: what it is})."""
    for name, (records, _) in runs.items():
        shared = [question_of(r) for r in records if normalize_question(question_of(r)) in forbidden]
        if shared:
            raise PersonaLoRAError(f"{name} would train on one of {forbidden[normalize_question(shared[0])]} ({shared[0]!r}): "
                                   "build finetuning data on the trait's finetuning questions (scripts/make_finetuning_data.py)")
