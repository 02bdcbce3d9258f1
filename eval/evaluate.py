"""The evaluation both steering methods share: answer the trait's held-out questions under a
condition (a merged persona LoRA, an activation hook, a system prompt, or nothing), judge every
answer for the trait and for coherence, and write one CSV row per answer, a summary and a manifest.

Same questions, same seeds, same judge for every condition: that is what makes rows comparable.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import lora_utils as lu
from eval.generation import generate_records
from eval.judge import COHERENCE_PROMPT, DEFAULT_OPENAI_JUDGE, make_judge
from eval.stats import mean_and_sem
from eval.traits import load_trait
from io_utils import PersonaLoRAError, atomic_path, write_json, write_manifest
from model_loading import default_persona_paths, is_embedded, load_model_and_tokenizer, model_label

CSV_COLUMNS_BEFORE_TRAIT = ["question_id", "question", "prompt", "answer"]
CSV_COLUMNS_AFTER_TRAIT = ["coherence", "coef", "method"]


@dataclass
class Condition:
    """One setting to evaluate. `steer` returns a context manager that is active while generating."""

    name: str
    method: str  # baseline | lora | lora_composed | activation | system_prompt | finetune
    coef: float = 0.0
    steer: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    instruction_type: str | None = None  # pos | neg: answer under the trait's system prompts
    identity: dict = field(default_factory=dict)  # what, besides the flags, determines the answers
    coefs: dict[str, float] | None = None  # a composition's coefficient per diff, by the diff's name


def add_generation_args(parser: argparse.ArgumentParser) -> None:
    """The model and how it answers the held-out questions (fill_generation_defaults completes them)."""
    parser.add_argument("--model", default=None, help="hub id or local folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--n_per_question", type=int, default=None, help="samples per question (default 3 embedded, 10 otherwise)")
    parser.add_argument("--max_new_tokens", type=int, default=None, help="default 64 embedded, 600 otherwise")
    parser.add_argument("--temperature", type=float, default=None, help="default 0.7 embedded, 1.0 otherwise")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="auto")


def add_eval_args(parser: argparse.ArgumentParser) -> None:
    add_generation_args(parser)
    parser.add_argument("--trait", required=True)
    parser.add_argument("--output_path", required=True, help="CSV; a .summary.json and a .manifest.json are written beside it")
    parser.add_argument("--judge", default=None, help="openai | hf:<model> | offline (default: openai if OPENAI_API_KEY is set, else offline)")
    parser.add_argument("--judge_model", default=DEFAULT_OPENAI_JUDGE)
    parser.add_argument("--judge_data", default=None,
                        help="offline judge: the extraction's data folder (default persona_loras/<model>/<trait>/data)")
    parser.add_argument("--adapter", default=None, help="a PEFT adapter (e.g. a finetune) merged into the model before evaluating")


def load_eval_model(args):
    """The model under evaluation: --model, with --adapter merged in when given."""
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype)
    if args.adapter:
        from peft import PeftModel

        if not (Path(args.adapter) / "adapter_config.json").is_file():
            raise PersonaLoRAError(f"--adapter {args.adapter} is not a PEFT adapter folder")
        lu.LoRAMerger(model).check(lu.load_adapter_update(args.adapter))  # refuse an adapter for another base
        model = PeftModel.from_pretrained(model, args.adapter).merge_and_unload().eval()
    return model, tokenizer


def fill_generation_defaults(args) -> None:
    embedded = is_embedded(args.model)
    defaults = dict(n_per_question=3 if embedded else 10, max_new_tokens=64 if embedded else 600,
                    temperature=0.7 if embedded else 1.0)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def fill_eval_defaults(args) -> None:
    fill_generation_defaults(args)
    args.judge_data = args.judge_data or str(default_persona_paths(args.model, args.trait)[0].parent / "data")


def file_identity(path) -> dict:
    """What a cached generation depends on: the file's content, not its timestamp (a rerun of the
    extraction rewrites an identical diff, and that must not invalidate finished answers)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return {"path": str(path), "sha256": digest.hexdigest()}


def evaluation_jobs(trait, n_per_question: int, instruction_type: str | None) -> list[dict]:
    jobs = []
    for question_index, question in enumerate(trait.evaluation_questions):
        for sample in range(n_per_question):
            system = None
            if instruction_type:  # cycle through the trait's instructions
                system = trait.instructions[(question_index + sample) % len(trait.instructions)][instruction_type]
            jobs.append({"id": f"q{question_index}-s{sample}", "question_id": f"{trait.name}_{question_index}",
                         "system": system, "messages": [{"role": "user", "content": question}]})
    return jobs


def generate_condition(args, model, tokenizer, trait, condition: Condition, work_dir: Path) -> list[dict]:
    """Answers for one condition, resumable: finished work files are reused, partial ones continued."""
    settings = {k: getattr(args, k) for k in ("model", "n_per_question", "max_new_tokens", "temperature", "seed")}
    if getattr(args, "adapter", None):
        settings["adapter"] = file_identity(Path(args.adapter) / "adapter_model.safetensors")
    settings.update(trait=hashlib.sha256(trait.path.read_bytes()).hexdigest(), condition=condition.name,
                    instruction_type=condition.instruction_type, **condition.identity)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
    path = work_dir / f"{condition.name}-{key}.jsonl"
    jobs = evaluation_jobs(trait, args.n_per_question, condition.instruction_type)
    if path.is_file():
        from io_utils import read_jsonl

        records = read_jsonl(path)
        if [r["id"] for r in records] == [j["id"] for j in jobs]:
            return records
    with condition.steer():
        return generate_records(model, tokenizer, jobs, path, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                batch_size=args.batch_size, seed=args.seed, desc=f"generating {condition.name}")


def is_failed(score) -> bool:
    """NaN marks an answer the judge could not score at all (None is a refusal)."""
    return score is not None and math.isnan(score)


def prepare_judge(args):
    """The trait and its judge, made before the model loads so that a bad trait or a missing key
    fails in a second, not after minutes of loading."""
    trait = load_trait(args.trait)
    return trait, make_judge(args.judge, trait, args.judge_model, args.judge_data)


def run_evaluation(args, trait, judge, conditions: list[Condition], model, tokenizer, started: float):
    """Generate under every condition (model loaded once), judge, write CSV + summary + manifest."""
    import pandas as pd

    output_path = Path(args.output_path)
    work_dir = output_path.parent / f".{output_path.stem}.work"
    generated = {c.name: generate_condition(args, model, tokenizer, trait, c, work_dir) for c in conditions}

    rows = []
    for condition in conditions:
        for record in generated[condition.name]:
            question = record["messages"][0]["content"]
            prompt = tokenizer.apply_chat_template(
                [*([{"role": "system", "content": record["system"]}] if record.get("system") else []), record["messages"][0]],
                tokenize=False, add_generation_prompt=True)
            rows.append({"question_id": record["question_id"], "question": question, "prompt": prompt,
                         "answer": record["messages"][-1]["content"], "coef": condition.coef, "method": condition.method,
                         "condition": condition.name, **{f"coef_{k}": c for k, c in (condition.coefs or {}).items()}})
    questions, answers = [r["question"] for r in rows], [r["answer"] for r in rows]
    trait_scores = judge.score_answers(trait.eval_prompt, questions, answers, desc=f"judging {trait.name}")
    coherence = judge.score_answers(COHERENCE_PROMPT, questions, answers, desc="judging coherence")
    for row, trait_score, coherence_score in zip(rows, trait_scores, coherence):
        row[trait.name], row["coherence"] = trait_score, coherence_score

    composition_columns = list(dict.fromkeys(f"coef_{k}" for c in conditions for k in (c.coefs or {})))
    frame = pd.DataFrame(rows)[CSV_COLUMNS_BEFORE_TRAIT + [trait.name] + CSV_COLUMNS_AFTER_TRAIT + composition_columns]
    with atomic_path(output_path) as tmp:
        frame.to_csv(tmp, index=False)

    summary = {"trait": trait.name, "model": model_label(args.model), "adapter": getattr(args, "adapter", None),
               "judge": judge.name,
               "judge_description": judge.description, "csv": str(output_path), "conditions": []}
    if hasattr(judge, "classifier"):
        summary["judge_quality"] = judge.classifier.report
    for condition in conditions:
        members = [i for i, r in enumerate(rows) if r["condition"] == condition.name]
        trait_mean, trait_sem, trait_n = mean_and_sem([trait_scores[i] for i in members])
        coherence_mean, coherence_sem, coherence_n = mean_and_sem([coherence[i] for i in members])
        summary["conditions"].append({
            "condition": condition.name, "method": condition.method, "coef": condition.coef, "answers": len(members),
            f"{trait.name}_mean": trait_mean, f"{trait.name}_sem": trait_sem, "coherence_mean": coherence_mean,
            "coherence_sem": coherence_sem,
            "refusals": sum(1 for i in members if trait_scores[i] is None or coherence[i] is None),
            "missing": sum(1 for i in members if is_failed(trait_scores[i]) or is_failed(coherence[i])),
            **({"coefs": condition.coefs} if condition.coefs else {}),
        })
    if getattr(judge, "failures", None):
        summary["judge_failures"] = len(judge.failures)
    write_json(output_path.with_suffix(".summary.json"), summary)
    write_manifest(output_path.parent, args, started, name=f"{output_path.stem}.manifest.json",
                      outputs={"csv": str(output_path)}, judge=judge.name)
    print_table(summary)
    return frame, summary


def print_table(summary: dict) -> None:
    trait = summary["trait"]
    print(f"\n{trait} on {summary['model']} — judge: {summary['judge_description']}")
    width = max([28] + [len(c["condition"]) for c in summary["conditions"]])
    print(f"{'condition':{width}s} {'method':13s} {'coef':>6s} {'n':>4s} {trait:>16s} {'coherence':>16s} {'missing':>7s}")
    for c in summary["conditions"]:
        print(f"{c['condition']:{width}s} {c['method']:13s} {c['coef']:6.2f} {c['answers']:4d} "
              f"{c[f'{trait}_mean']:8.2f} ± {c[f'{trait}_sem']:5.2f} {c['coherence_mean']:8.2f} ± {c['coherence_sem']:5.2f} "
              f"{c['missing'] + c['refusals']:7d}")
