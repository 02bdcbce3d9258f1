"""Trait definitions: dataset/<trait>/trait.json, validated on load (schema in dataset/README.md)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lora_utils import PersonaLoRAError, read_json_object

DATASET_DIR = Path(__file__).resolve().parents[1] / "dataset"
MIN_INSTRUCTION_PAIRS = 5
MIN_QUESTIONS = 20
REQUIRED_FIELDS = {
    "trait": str,
    "description": str,
    "instructions": list,
    "extraction_questions": list,
    "evaluation_questions": list,
    "eval_prompt": str,
}


@dataclass(frozen=True)
class Trait:
    name: str
    description: str
    instructions: list[dict]  # [{"pos": system prompt eliciting the trait, "neg": its opposite}]
    extraction_questions: list[str]
    evaluation_questions: list[str]
    eval_prompt: str  # judge rubric with {question} and {answer}; the judge answers 0–100 only
    path: Path

    def judge_prompt(self, question: str, answer: str) -> str:
        return self.eval_prompt.replace("{question}", question).replace("{answer}", answer)


def available_traits(dataset_dir: Path = DATASET_DIR) -> list[str]:
    return sorted(p.parent.name for p in Path(dataset_dir).glob("*/trait.json"))


def load_trait(name: str, dataset_dir: Path = DATASET_DIR) -> Trait:
    """Load and validate a trait; errors name the file and what to fix."""
    path = Path(dataset_dir) / name / "trait.json"
    if not path.is_file():
        raise PersonaLoRAError(
            f"unknown trait '{name}': no {path}. Available: {', '.join(available_traits(dataset_dir)) or 'none'} "
            "(add a trait by adding dataset/<trait>/trait.json, see dataset/README.md)"
        )
    data = read_json_object(path, "trait file")
    for field, kind in REQUIRED_FIELDS.items():
        if field not in data:
            raise PersonaLoRAError(f"{path} is missing the field '{field}' (see dataset/README.md)")
        if not isinstance(data[field], kind):
            raise PersonaLoRAError(f"{path}: '{field}' must be a {kind.__name__}")
    unknown = set(data) - set(REQUIRED_FIELDS)
    if unknown:
        raise PersonaLoRAError(f"{path}: unknown field(s) {', '.join(sorted(unknown))} (see dataset/README.md)")
    if data["trait"] != name:
        raise PersonaLoRAError(f"{path}: 'trait' is '{data['trait']}' but the folder is '{name}'")
    pairs = data["instructions"]
    if len(pairs) < MIN_INSTRUCTION_PAIRS:
        raise PersonaLoRAError(f"{path}: needs at least {MIN_INSTRUCTION_PAIRS} instruction pairs, has {len(pairs)}")
    for index, pair in enumerate(pairs):
        if not (isinstance(pair, dict) and set(pair) == {"pos", "neg"} and all(isinstance(v, str) and v.strip() for v in pair.values())):
            raise PersonaLoRAError(f"{path}: instructions[{index}] must be {{\"pos\": \"...\", \"neg\": \"...\"}} with non-empty text")
    for field in ("extraction_questions", "evaluation_questions"):
        questions = data[field]
        if len(questions) < MIN_QUESTIONS:
            raise PersonaLoRAError(f"{path}: '{field}' needs at least {MIN_QUESTIONS} questions, has {len(questions)}")
        if not all(isinstance(q, str) and q.strip() for q in questions):
            raise PersonaLoRAError(f"{path}: every entry of '{field}' must be a non-empty string")
        if len(set(questions)) != len(questions):
            raise PersonaLoRAError(f"{path}: '{field}' has duplicate questions")
    overlap = set(map(str.strip, data["extraction_questions"])) & set(map(str.strip, data["evaluation_questions"]))
    if overlap:
        raise PersonaLoRAError(f"{path}: question used for both extraction and evaluation: {sorted(overlap)[0]!r}")
    if "{question}" not in data["eval_prompt"] or "{answer}" not in data["eval_prompt"]:
        raise PersonaLoRAError(f"{path}: 'eval_prompt' must contain the placeholders {{question}} and {{answer}}")
    return Trait(name, data["description"], pairs, data["extraction_questions"], data["evaluation_questions"],
                 data["eval_prompt"], path)
