"""How a trait (or its opposite) is elicited from the unsteered model: one of the trait's system
prompts, optionally preceded by K few-shot demonstrations as earlier chat turns.

A 135M model barely follows a system prompt alone for some traits (its "candid" and "flattering"
answers are alike); K demonstrations of the wanted behaviour make the contrast real. Adapters are
trained on question → answer only (eval.generation.conversation(record, with_context=False)), so
the persona diff distils the in-context behaviour into weights. Every stage that elicits a trait
(the extraction's contrastive data, the offline judge's data, finetuning data, the reference
answers of the judge-free margin) builds its jobs here, each on its own questions.
"""

from __future__ import annotations

from io_utils import PersonaLoRAError

SIDES = ("pos", "neg")


def check_fewshot(trait, fewshot: int, flag: str = "--fewshot") -> None:
    if fewshot < 0:
        raise PersonaLoRAError(f"{flag} {fewshot} must be ≥ 0")
    if fewshot > len(trait.demonstrations):
        raise PersonaLoRAError(f"{flag} {fewshot}: {trait.path} has {len(trait.demonstrations)} demonstrations; "
                               f"use at most that many (or add more under 'demonstrations')")


def demonstrations_for(trait, side: str, fewshot: int, offset: int) -> list[list[str]]:
    """K (question, answer) pairs showing `side`, rotating through the trait's demonstrations so
    that consecutive jobs see different examples."""
    demos = trait.demonstrations
    return [[demos[(offset + k) % len(demos)]["question"], demos[(offset + k) % len(demos)][side]] for k in range(fewshot)]


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
                    "demonstrations": demonstrations_for(trait, side, fewshot, job_index),
                    "messages": [{"role": "user", "content": question}],
                })
    return jobs
