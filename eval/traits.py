"""Trait definitions: dataset/<trait>/trait.json (and its A/B set ab.jsonl), validated on load.

Every question set of a trait has one job; the sets are disjoint, no question is listed twice,
and no question of one trait is another trait's (composition scores one trait's diff on another's
questions), checked here:
    extraction_questions   pos/neg answers that train the persona adapters and give the vector
    finetuning_questions   fresh answers for the finetunes of Experiments 2 and 3
    evaluation_questions   held out: every judged and judge-free evaluation
    judge_questions        the offline judge's own training answers
    demonstrations         few-shot examples shown while eliciting pos/neg answers (optional)
    ab.jsonl               forced-choice A/B items (optional; the public A/B format)
    public_ab.json         the trait's public counterpart (optional): {"public_ab": an A/B file
                           under dataset/, written by others}, for extract_persona_lora.py --ab_source public
The schema is documented in dataset/README.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from eval.ab import ABItem, load_ab_items
from io_utils import PersonaLoRAError, read_json_object

DATASET_DIR = Path(__file__).resolve().parents[1] / "dataset"
MIN_INSTRUCTION_PAIRS = 5
MIN_QUESTIONS = 20
QUESTION_SETS = ("extraction_questions", "evaluation_questions", "finetuning_questions", "judge_questions")
REQUIRED_FIELDS = {
    "trait": str,
    "description": str,
    "instructions": list,
    **{name: list for name in QUESTION_SETS},
    "eval_prompt": str,
}
OPTIONAL_FIELDS = {"demonstrations": list}
AB_FILE = "ab.jsonl"
PUBLIC_AB_FILE = "public_ab.json"  # beside trait.json, not in it: trait.json's hash keys every cached answer of the trait


@dataclass(frozen=True)
class Trait:
    name: str
    description: str
    instructions: list[dict]  # [{"pos": system prompt eliciting the trait, "neg": its opposite}]
    extraction_questions: list[str]
    evaluation_questions: list[str]
    finetuning_questions: list[str]
    judge_questions: list[str]
    eval_prompt: str  # judge rubric with {question} and {answer}; the judge answers 0–100 only
    path: Path
    demonstrations: list[dict] = field(default_factory=list)  # [{"question", "pos", "neg"}]
    ab_items: list[ABItem] = field(default_factory=list)
    public_ab: Path | None = None  # the public A/B file of the same behaviour, if the trait links one

    @property
    def ab_path(self) -> Path:
        return self.path.parent / AB_FILE


def available_traits(dataset_dir: Path = DATASET_DIR) -> list[str]:
    return sorted(p.parent.name for p in Path(dataset_dir).glob("*/trait.json"))


def _check_question_list(path: Path, name: str, questions: list) -> None:
    if len(questions) < MIN_QUESTIONS:
        raise PersonaLoRAError(f"{path}: '{name}' needs at least {MIN_QUESTIONS} questions, has {len(questions)}")
    if not all(isinstance(q, str) and q.strip() for q in questions):
        raise PersonaLoRAError(f"{path}: every entry of '{name}' must be a non-empty string")
    if len({q.strip() for q in questions}) != len(questions):
        raise PersonaLoRAError(f"{path}: '{name}' has duplicate questions")


def _check_demonstrations(path: Path, demonstrations: list) -> None:
    for index, demo in enumerate(demonstrations):
        if not (isinstance(demo, dict) and set(demo) == {"question", "pos", "neg"}
                and all(isinstance(v, str) and v.strip() for v in demo.values())):
            raise PersonaLoRAError(f"{path}: demonstrations[{index}] must be {{\"question\", \"pos\", \"neg\"}} with non-empty text")


def normalize_question(question: str) -> str:
    """A question as compared for reuse: case, punctuation and spacing do not make it another."""
    return " ".join(re.sub(r"[^\w\s]", " ", question.lower()).split())


QuestionSets = dict[str, tuple[Path, list[str]]]  # a set's name: (the file that holds it, its questions)


def _check_disjoint(sets: QuestionSets) -> None:
    """No question may serve two jobs, nor one job twice: a model trained on a question's answers
    must not be evaluated, judged or finetuned on it; a demonstration listed twice would sit in two
    stages' pools, and an A/B stem listed twice would count as two items."""
    seen: dict[str, str] = {}
    for name, (file, questions) in sets.items():
        for question in questions:
            key = normalize_question(question)
            if key in seen:
                where = f"twice in {name}" if seen[key] == name else f"for both {seen[key]} and {name}"
                raise PersonaLoRAError(f"{file}: question used {where}: {question.strip()!r}")
            seen[key] = name


def _question_sets(trait_path: Path, data: dict, ab_items: list[ABItem]) -> QuestionSets:
    """Every question of a trait, by the job it does, as written in its files."""
    def texts(items) -> list[str]:  # another trait's file is read as it is, not validated again
        return [q for q in items if isinstance(q, str)] if isinstance(items, list) else []

    return {**{key.removesuffix("_questions"): (trait_path, texts(data.get(key))) for key in QUESTION_SETS},
            "demonstrations": (trait_path, texts([d.get("question") for d in data.get("demonstrations", []) if isinstance(d, dict)])),
            f"{AB_FILE} items": (trait_path.parent / AB_FILE, [item.stem for item in ab_items if item.stem is not None])}


def _check_apart_from_other_traits(name: str, sets: QuestionSets, dataset_dir: Path) -> None:
    """No question of this trait may be another trait's: composition scores one trait's diff on
    another's evaluation questions, which its adapters must never have trained on."""
    own = {normalize_question(q): (set_name, file, q) for set_name, (file, questions) in sets.items() for q in questions}
    for other in available_traits(dataset_dir):
        if other == name:
            continue
        path = Path(dataset_dir) / other / "trait.json"
        ab_path = path.parent / AB_FILE
        other_sets = _question_sets(path, read_json_object(path, "trait file"), load_ab_items(ab_path) if ab_path.is_file() else [])
        for other_set, (other_file, questions) in other_sets.items():
            for question in questions:
                key = normalize_question(question)
                if key in own:
                    set_name, file, mine = own[key]
                    raise PersonaLoRAError(f"{file}: question in {set_name} is also in {other_file} ({other_set}); every trait's "
                                           f"questions must differ from every other trait's: {mine.strip()!r}")


def measured_questions(dataset_dir: Path = DATASET_DIR) -> dict[str, str]:
    """Every trait's questions that measure something (evaluation, judge, A/B), normalised, with
    where each comes from: no finetune may train on one of them."""
    found = {}
    for name in available_traits(dataset_dir):
        trait = load_trait(name, dataset_dir)
        for stage, questions in (("evaluation", trait.evaluation_questions), ("judge", trait.judge_questions),
                                 ("A/B", [item.stem for item in trait.ab_items if item.stem])):
            found.update({normalize_question(q): f"{name}'s {stage} questions" for q in questions})
    return found


def linked_public_ab(link: Path, dataset_dir: Path) -> Path | None:
    """The A/B file that a trait's public_ab.json links (a path relative to dataset/), or None."""
    if not link.is_file():
        return None
    target = read_json_object(link, "public counterpart link").get("public_ab")
    if not isinstance(target, str) or not (dataset_dir / target).is_file():
        raise PersonaLoRAError(f"{link}: 'public_ab' must name an A/B file relative to {dataset_dir}, e.g. "
                               '"external/caa/generate/sycophancy/generate_dataset.json"')
    return dataset_dir / target


def load_trait(name: str, dataset_dir: Path = DATASET_DIR) -> Trait:
    """Load and validate a trait; errors name the file and what to fix."""
    path = Path(dataset_dir) / name / "trait.json"
    if not path.is_file():
        raise PersonaLoRAError(
            f"unknown trait '{name}': no {path}. Available: {', '.join(available_traits(dataset_dir)) or 'none'} "
            "(add a trait by adding dataset/<trait>/trait.json, see dataset/README.md)"
        )
    data = read_json_object(path, "trait file")
    for key, kind in REQUIRED_FIELDS.items():
        if key not in data:
            raise PersonaLoRAError(f"{path} is missing the field '{key}' (see dataset/README.md)")
        if not isinstance(data[key], kind):
            raise PersonaLoRAError(f"{path}: '{key}' must be a {kind.__name__}")
    for key, kind in OPTIONAL_FIELDS.items():
        if key in data and not isinstance(data[key], kind):
            raise PersonaLoRAError(f"{path}: '{key}' must be a {kind.__name__}")
    unknown = set(data) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS)
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
    for key in QUESTION_SETS:
        _check_question_list(path, key, data[key])
    demonstrations = data.get("demonstrations", [])
    _check_demonstrations(path, demonstrations)
    ab_path = path.parent / AB_FILE
    ab_items = load_ab_items(ab_path) if ab_path.is_file() else []
    sets = _question_sets(path, data, ab_items)
    _check_disjoint(sets)
    _check_apart_from_other_traits(name, sets, dataset_dir)
    if "{question}" not in data["eval_prompt"] or "{answer}" not in data["eval_prompt"]:
        raise PersonaLoRAError(f"{path}: 'eval_prompt' must contain the placeholders {{question}} and {{answer}}")
    public_ab = linked_public_ab(path.parent / PUBLIC_AB_FILE, Path(dataset_dir))
    return Trait(name, data["description"], pairs, data["extraction_questions"], data["evaluation_questions"],
                 data["finetuning_questions"], data["judge_questions"], data["eval_prompt"], path, demonstrations, ab_items,
                 public_ab)
