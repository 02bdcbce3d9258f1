"""The offline judge's own data: the unsteered model's answers to the trait's judge questions under
its pos and neg prompts (with demonstrations from the judge's own pool), which no other stage
trains on or measures."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from eval.elicitation import SIDES, pool_size, prompted_jobs
from eval.generation import GenerationSettings, cached_generation, stream_seed

# The judge's data: the trait's own prompts with this many demonstrations (when the trait has
# them), one answer per judge question and instruction, seeded apart from every other stage
# (eval.generation.SEED_STREAMS).
JUDGE_DATA_FEWSHOT = 4


def judge_data_jobs(trait) -> dict[str, list[dict]]:
    """Every judge question under every pos (neg) instruction, with demonstrations when the trait
    has them: the judge learns the trait from answers no other stage trains on or measures."""
    fewshot = min(JUDGE_DATA_FEWSHOT, pool_size(trait))
    return {side: prompted_jobs(trait, trait.judge_questions, side, n_per_question=1, fewshot=fewshot, stage="judge",
                                every_instruction=True) for side in SIDES}


def write_judge_data(model, tokenizer, trait, folder: Path, settings: GenerationSettings) -> Path:
    """Generate the offline judge's data (folder/pos.jsonl, neg.jsonl) with the unsteered model,
    unless it is there (eval.generation.cached_generation: resumable; data made from another trait
    file, model or settings is refused, not reused). One answer per judge question and instruction,
    drawn from the judge's own seed stream whatever the caller's seed."""
    settings = dataclasses.replace(settings, n_per_question=1, seed=stream_seed("judge_pos"))
    trait_file = hashlib.sha256(trait.path.read_bytes()).hexdigest()
    for side, jobs in judge_data_jobs(trait).items():
        cached_generation(model, tokenizer, jobs, folder / f"{side}.jsonl", settings,
                          seed=stream_seed(f"judge_{side}"), desc=f"judge data ({side})",
                          trait_file_sha256=trait_file)
    return folder
