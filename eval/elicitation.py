"""How a trait (or its opposite) is elicited from the unsteered model: one of the trait's system
prompts, optionally preceded by K few-shot demonstrations as earlier chat turns.

A 135M model barely follows a system prompt alone for some traits (its "candid" and "flattering"
answers are alike); K demonstrations of the wanted behaviour make the contrast real. Adapters are
trained on question → answer only (eval.generation.conversation(record, with_context=False)), so
the persona diff distils the in-context behaviour into weights. Every stage that elicits a trait
(the extraction's contrastive data, the offline judge's data, finetuning data, the reference
answers of the judge-free margin) builds its jobs here, each on its own questions and with its own demonstrations.
"""

from __future__ import annotations

from io_utils import PersonaLoRAError

SIDES = ("pos", "neg")


# Each stage shows demonstrations from its own quarter of the trait's list: a small model copies a
# demonstration's wording, so shared demonstrations would let the judge, the references of the
# margin and the finetuning data all reward the extraction's phrasing (the LoRA's, not the trait's).
STAGE_POOLS = {"extraction": 0, "judge": 1, "finetuning": 2, "evaluation": 3}


def pool_size(trait) -> int:
    """How many demonstrations each stage has: the most K can be."""
    return len(trait.demonstrations) // len(STAGE_POOLS)


def demonstration_pool(trait, stage: str) -> list[dict]:
    """The stage's own quarter of the trait's demonstrations (disjoint from every other stage's)."""
    start = STAGE_POOLS[stage] * pool_size(trait)
    return trait.demonstrations[start:start + pool_size(trait)]


def check_fewshot(trait, fewshot: int, flag: str = "--fewshot") -> None:
    """K demonstrations must fit in every stage's pool (a quarter of the trait's list)."""
    if fewshot < 0:
        raise PersonaLoRAError(f"{flag} {fewshot} must be ≥ 0")
    pool = pool_size(trait)
    if fewshot > pool:
        raise PersonaLoRAError(f"{flag} {fewshot}: {trait.path} has {len(trait.demonstrations)} demonstrations, split in "
                               f"{len(STAGE_POOLS)} pools of {pool} (one per stage); use at most {pool} (or add more)")


def demonstrations_for(trait, stage: str, side: str, fewshot: int, offset: int) -> list[list[str]]:
    """K (question, answer) pairs showing `side`, from the stage's own pool, rotating through it
    so that consecutive jobs see different examples."""
    pool = demonstration_pool(trait, stage)
    return [[pool[(offset + k) % len(pool)]["question"], pool[(offset + k) % len(pool)][side]] for k in range(fewshot)]


def question_id(trait_name: str, stage: str, index: int) -> str:
    """How rows name a question: evaluation questions as <trait>_<index> (Persona Vectors' CSVs),
    the other splits with their stage, so that ids of different splits never collide."""
    return f"{trait_name}_{index}" if stage == "evaluation" else f"{trait_name}_{stage}_{index}"


def prompted_jobs(trait, questions: list[str], side: str, *, n_per_question: int, fewshot: int, stage: str,
                  every_instruction: bool) -> list[dict]:
    """Generation jobs answering `questions` under the trait's `side` ("pos"/"neg") system prompts.

    every_instruction: each question under each of the instructions (the contrastive data of the
    extraction and of the judge); otherwise the instructions rotate over questions and samples
    (one prompt per answer: finetuning data and reference answers).
    The job id says the stage, side, instruction, question and sample, so answers never mix."""
    if side not in SIDES:
        raise ValueError(f"side {side!r} is not pos or neg")
    jobs = []
    pairs = trait.instructions
    for question_index, question in enumerate(questions):
        for sample in range(n_per_question):
            instruction_indices = range(len(pairs)) if every_instruction else [(question_index + sample) % len(pairs)]
            for instruction_index in instruction_indices:
                job_index = len(jobs)
                jobs.append({
                    "id": f"{stage}-{side}-i{instruction_index}-q{question_index}-s{sample}",
                    "side": side, "instruction_index": instruction_index, "question_index": question_index,
                    "question_id": question_id(trait.name, stage, question_index), "sample": sample,
                    "system": pairs[instruction_index][side],
                    "demonstrations": demonstrations_for(trait, stage, side, fewshot, job_index),
                    "messages": [{"role": "user", "content": question}],
                })
    return jobs
