"""Finetuning data nobody in this repository wrote, for Experiment 2 on external data.

Three kinds of chat-JSONL set, in the format training.py and scripts/make_mixtures.py read:

- CAA's public sycophancy items, each answered the matching way (pos) and the non-matching way
  (neg): the trait / anti-trait pair whose mixtures make the finetuning series;
- each of CAA's six other behaviours answered the matching way (pos): finetunes that move other
  behaviours, the series' off-target points;
- MMLU questions with their correct answers (benign): a finetune that should move no behaviour.

Every A/B item is drawn from the *finetuning pool* of its behaviour: the extraction side of the
seeded split (eval.ab_source.split_ab_items, grouped by question) beyond the items the A/B
extraction trained on. For sycophancy the split, its seed and the items used are read from the A/B
extraction's own record (summary.json's "source"), recomputed and compared, so no finetune trains
on an item the A/B persona diff was trained on or that its evaluation (ab_evaluation.jsonl) scores.
For the other behaviours the same split function, fraction and seed give the pool beyond the first
`ab_max_items` extraction items, so a later A/B extraction of that behaviour with the same settings
stays disjoint from every finetune. An item whose question is also one of the used items' (a
question listed twice can straddle the cap) or one that a trait of dataset/ measures is left out of
the pool and counted. Answers are the letter and the choice's text ("(B) Disagree"), so that a
finetune learns a stance, not a letter; each set's letters are balanced (seeded) first.

MMLU's questions exclude the capability check's scored subset: eval/mmlu.py has no held-out part,
it scores the first --n questions of a seeded sample, and below ~1,300 questions a larger --n with
the same seed only extends that sample (random.sample draws one index at a time), so leaving out
the default 500 at seed 0 leaves out every smaller check too (tested).
"""

from __future__ import annotations

import random
from pathlib import Path

from eval.ab import ABItem
from eval.ab_source import balance_letters, choice_text, load_ab_source, measured_items, question_key, split_ab_items
from eval.traits import DATASET_DIR, measured_questions, normalize_question
from io_utils import PersonaLoRAError, file_identity, read_json_object

CAA_DIR = DATASET_DIR / "external" / "caa" / "generate"
TRAIT_BEHAVIOUR = "sycophancy"  # the behaviour whose A/B persona diff the series is projected onto
OTHER_BEHAVIOURS = ("hallucination", "corrigible-neutral-HHH", "survival-instinct", "power-seeking-inclination",
                    "myopic-reward", "coordinate-other-ais")
BENIGN = "mmlu"
MMLU_CAPABILITY_N, MMLU_CAPABILITY_SEED = 500, 0  # eval/mmlu.py's defaults


def behaviour_file(behaviour: str) -> Path:
    if behaviour not in (TRAIT_BEHAVIOUR, *OTHER_BEHAVIOURS):
        raise PersonaLoRAError(f"--behaviours: unknown behaviour '{behaviour}'; CAA's are {', '.join(OTHER_BEHAVIOURS)} "
                               f"(and {TRAIT_BEHAVIOUR}, the trait's own)")
    return CAA_DIR / behaviour / "generate_dataset.json"


def recorded_split(ab_extraction: str | Path) -> dict:
    """The split an A/B extraction (extract_persona_lora.py --ab_source) recorded in its
    summary.json: {"seed", "evaluation_fraction", "extraction_items", "extraction_used",
    "evaluation_items"}, and the A/B file it split (checked to be CAA's sycophancy set)."""
    folder = Path(ab_extraction)
    summary_path = folder / "summary.json"
    if not summary_path.is_file():
        raise PersonaLoRAError(f"--ab_extraction {folder} holds no summary.json: give the --output_dir of "
                               "extract_persona_lora.py --trait sycophancy --ab_source public")
    source = read_json_object(summary_path, "extraction summary").get("source") or {}
    split = source.get("split")
    keys = ("seed", "evaluation_fraction", "extraction_items", "extraction_used", "evaluation_items")
    if source.get("kind") != "ab" or not isinstance(split, dict) or any(key not in split for key in keys):
        raise PersonaLoRAError(f"--ab_extraction {summary_path} records no A/B split (source.split with {', '.join(keys)}): "
                               "give the folder of an extract_persona_lora.py --ab_source run")
    recorded_sha = (source.get("ab_source") or {}).get("sha256")
    expected = file_identity(behaviour_file(TRAIT_BEHAVIOUR))["sha256"]
    if recorded_sha != expected:
        raise PersonaLoRAError(f"--ab_extraction {folder} split another A/B file than {behaviour_file(TRAIT_BEHAVIOUR)} "
                               f"(sha256 {str(recorded_sha)[:12]}… vs {expected[:12]}…): extract from --ab_source public")
    return split


def finetuning_pool(items: list[ABItem], evaluation_fraction: float, seed: int, used: int, measured: dict[str, str],
                    recorded: dict | None = None) -> tuple[list[int], dict]:
    """The item indices a finetune may train on, in the split's order, and a report of what was
    left out. `recorded`: an extraction's recorded split, which must be the one split_ab_items gives
    (else the indices would name other items), and the pool is checked against its used and
    evaluation items."""
    split = split_ab_items(items, evaluation_fraction, seed)
    used_items, evaluation_items = split.extraction[:used], split.evaluation
    if recorded is not None:
        if recorded["extraction_items"] != split.extraction or recorded["evaluation_items"] != split.evaluation:
            raise PersonaLoRAError("--ab_extraction: its recorded split is not what eval.ab_source.split_ab_items gives for "
                                   f"seed {seed} and fraction {evaluation_fraction}: re-extract it with this version")
        used_items, evaluation_items = recorded["extraction_used"], recorded["evaluation_items"]
    by_index = {item.index: item for item in items}
    forbidden_questions = {question_key(by_index[i]) for i in [*used_items, *evaluation_items]}
    beyond = [i for i in split.extraction if i not in set(used_items)]
    shares_question = [i for i in beyond if question_key(by_index[i]) in forbidden_questions]
    measured_here = dict(measured_items(items, beyond, measured))
    pool = [i for i in beyond if i not in set(shares_question) and i not in measured_here]
    overlap = set(pool) & {*used_items, *evaluation_items}
    if overlap or {question_key(by_index[i]) for i in pool} & forbidden_questions:
        raise PersonaLoRAError(f"the finetuning pool overlaps the A/B extraction's used or evaluation items (item "
                               f"{min(overlap) if overlap else '?'}): refusing to train a finetune on what the persona or its evaluation saw")
    return pool, {"split_seed": seed, "evaluation_fraction": evaluation_fraction, "extraction_used": len(used_items),
                  "evaluation_items": len(evaluation_items), "pool": len(pool),
                  "left_out_sharing_a_question_with_used_or_evaluation": shares_question,
                  "left_out_measured": sorted(measured_here)}


def draw(pool: list, n: int, seed: int, name: str, where: str) -> list:
    if n > len(pool):
        raise PersonaLoRAError(f"--n {n} is more than the {len(pool)} examples of {name}'s finetuning pool ({where}); lower --n")
    return random.Random(f"external-finetuning:{seed}:{name}").sample(pool, n)


def ab_set(items: list[ABItem], indices: list[int], seed: int, behaviour: str, sides: tuple[str, ...]) -> tuple[dict, dict]:
    """Per side, chat records for the drawn items (pos: the matching answer; neg: the first
    non-matching one), letter + choice text, letters balanced; and the letter report."""
    by_index = {item.index: item for item in items}
    balanced, letters = balance_letters([by_index[i] for i in indices], seed)
    records = {side: [] for side in sides}
    for item in balanced:
        for side in sides:
            answer = item.matching if side == "pos" else item.not_matching[0]
            records[side].append({"messages": [{"role": "user", "content": item.question},
                                               {"role": "assistant", "content": choice_text(item, answer)}],
                                  "source": {"behaviour": behaviour, "item_index": item.index, "side": side,
                                             "choices_swapped": item.index in letters["swapped_items"]}})
    return records, letters


def mmlu_question(row: dict) -> tuple[str, str]:
    """An MMLU row as an A/B-style question with its choices, and its correct answer as letter +
    choice text: the external sets' format, so the benign set differs from them in content only."""
    letters = "ABCD"
    options = "\n".join(f" ({letter}) {choice}" for letter, choice in zip(letters, row["choices"]))
    answer = row["answer"]
    return f"{row['question']}\n\nChoices:\n{options}", f"({letters[answer]}) {row['choices'][answer]}"


def mmlu_set(n: int, seed: int, measured: dict[str, str], capability_n: int = MMLU_CAPABILITY_N,
             capability_seed: int = MMLU_CAPABILITY_SEED) -> tuple[list[dict], dict]:
    """n packaged MMLU questions with their correct answers, none of the capability check's scored
    subset (eval/mmlu.py --n capability_n --seed capability_seed) nor any measured question."""
    from eval.mmlu import load_questions, seeded_subset

    rows, _ = load_questions("packaged")
    scored = {normalize_question(r["question"]) for r in seeded_subset(rows, capability_n, capability_seed)}
    pool = [i for i, r in enumerate(rows) if normalize_question(r["question"]) not in scored
            and normalize_question(r["question"]) not in measured]
    chosen = draw(pool, n, seed, BENIGN, f"packaged MMLU less the capability check's {capability_n} questions at seed {capability_seed}")
    records = []
    for index in chosen:
        question, answer = mmlu_question(rows[index])
        records.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                        "source": {"behaviour": BENIGN, "item_index": index, "side": "correct"}})
    return records, {"questions": len(rows), "pool": len(pool), "excluded_capability_subset": {"n": capability_n, "seed": capability_seed}}


def build_sets(ab_extraction: str | Path, n: int, seed: int, behaviours=OTHER_BEHAVIOURS, ab_max_items: int | None = None,
               benign: bool = True) -> tuple[dict[str, dict[str, list[dict]]], dict]:
    """{set name: {side: records}} and a report per set (its pool, letters, every example's
    provenance), all refused before anything is written."""
    for behaviour in behaviours:
        behaviour_file(behaviour)
    split = recorded_split(ab_extraction)
    seed_, fraction = split["seed"], split["evaluation_fraction"]
    used = ab_max_items if ab_max_items is not None else len(split["extraction_used"])
    measured = measured_questions()
    sets, report = {}, {}
    for behaviour in (TRAIT_BEHAVIOUR, *behaviours):
        path = behaviour_file(behaviour)
        items = load_ab_source(path, "--behaviours")
        if behaviour == TRAIT_BEHAVIOUR:
            pool, pool_report = finetuning_pool(items, fraction, seed_, len(split["extraction_used"]), measured, split)
            sides = ("pos", "neg")
        else:
            pool, pool_report = finetuning_pool(items, fraction, seed_, used, measured)
            sides = ("pos",)
        chosen = draw(pool, n, seed, behaviour, f"{path}, beyond the extraction's first {pool_report['extraction_used']} "
                                                "items, never its evaluation items")
        sets[behaviour], letters = ab_set(items, chosen, seed, behaviour, sides)
        report[behaviour] = {"file": file_identity(path), **pool_report, "letter_balance": letters,
                             "examples": {side: [r["source"] for r in records] for side, records in sets[behaviour].items()}}
    if benign:
        records, mmlu_report = mmlu_set(n, seed, measured)
        sets[BENIGN] = {"correct": records}
        report[BENIGN] = {**mmlu_report, "examples": {"correct": [r["source"] for r in records]}}
    return sets, report
