"""The evaluation every steering method shares: answer the trait's held-out questions under a
condition (a merged persona LoRA, an activation hook, a system prompt, a finetune, or nothing),
judge every answer for the trait and for coherence, measure the judge-free log-likelihood margin
under the same condition, and write one CSV row per answer, a summary and a manifest. With
A/B data instead, score forced-choice items under every condition (eval/ab.py).

Same questions, same seeds, same judge for every condition: that is what makes rows comparable,
and what lets the summary pair conditions by question. Every input that can be refused is
checked by `prepare_evaluation`, before a model is loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import lora_utils as lu
from eval.ab import load_ab_items, method_slopes, score_ab_items, summarize_conditions
from eval.elicitation import SIDES, check_fewshot, pool_size, prompted_jobs
from eval.generation import (
    GenerationSettings,
    answers_identity,
    cached_generation,
    conversation,
    identity_key,
    response_log_likelihoods,
    stream_seed,
)
from eval.judge import DEFAULT_OPENAI_JUDGE, Judge, make_judge
from eval.stats import cluster_means, clustered_mean_and_sem, holm, mean_and_sem, paired_difference, paired_slope
from eval.traits import Trait, load_trait
from io_utils import (
    STAGES,
    OutputLock,
    PersonaLoRAError,
    atomic_path,
    check_writable,
    file_identity,
    non_negative_float,
    non_negative_int,
    positive_int,
    read_json_object,
    unit_interval,
    write_json,
    write_manifest,
)
from model_loading import (
    check_dtype,
    check_model_source,
    default_judge_data_dir,
    is_embedded,
    load_model_and_tokenizer,
    model_identity,
    model_label,
    resolve_dtype,
    resolve_model_folder,
)

CSV_COLUMNS_BEFORE_TRAIT = ["question_id", "question", "prompt", "answer"]
CSV_COLUMNS_AFTER_TRAIT = ["coherence", "coef", "method"]
AB_CSV_COLUMNS = ["question_id", "question", "coef", "method", "p_matching", "p_matching_swapped", "p_first", "p_first_swapped",
                  "choice_log_mass"]
COHERENT = 50  # the coherence above which an answer counts as coherent (Persona Vectors' filter)
MARGIN_MEASURE = ("mean log-probability per answer token of the unsteered model's pos-prompted minus its neg-prompted reference "
                  "answers to the held-out questions, scored without the prompt (nats/token; higher = closer to the trait)")


@dataclass
class Condition:
    """One setting to evaluate. `steer` returns a context manager that is active while generating
    and while scoring (margins, A/B items)."""

    name: str
    method: str  # baseline | lora | lora_composed | activation | system_prompt | finetune
    coef: float = 0.0
    steer: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    instruction_type: str | None = None  # pos | neg: answer under the trait's system prompts
    identity: dict = field(default_factory=dict)  # what, besides the settings, determines the answers
    coefs: dict[str, float] | None = None  # a composition's coefficient per diff, by the diff's name


@dataclass
class EvalResult:
    frame: object  # the CSV as a pandas DataFrame
    summary: dict
    answers: dict[str, list[dict]] | None = None  # judged mode: each condition's answer records


@dataclass
class EvalRun:
    """A checked evaluation: what to evaluate, how, and where the results go."""

    trait: Trait
    settings: GenerationSettings
    output_path: Path
    arguments: dict
    judge: Judge | None = None  # None in A/B mode: forced choices need no judge
    adapter: str | None = None
    fewshot: int = 0  # demonstrations before prompted answers (prompted conditions and the margin's references)
    margin: bool = True
    ab_items: list | None = None
    ab_path: str | None = None
    ab_system_prompt: str | None = None
    started: float = field(default_factory=time.time)
    lock: OutputLock | None = None  # held from the checks to the written outputs: one writer per output


# ---------------------------------------------------------------------------------------------
# Flags, and every check that can happen before a model is loaded
# ---------------------------------------------------------------------------------------------


def add_generation_args(parser: argparse.ArgumentParser) -> None:
    """The model and how it answers (GenerationSettings.for_model fills the defaults)."""
    parser.add_argument("--model", default=None, help="hub id or local folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--n_per_question", type=positive_int, default=None, help="samples per question (default 3 embedded, 10 otherwise)")
    parser.add_argument("--max_new_tokens", type=positive_int, default=None, help="default 64 embedded, 600 otherwise")
    parser.add_argument("--temperature", type=non_negative_float, default=None, help="default 0.7 embedded, 1.0 otherwise (0: greedy)")
    parser.add_argument("--top_p", type=unit_interval, default=1.0)
    parser.add_argument("--batch_size", type=positive_int, default=64)
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, float32 on CPU), float32, bfloat16")


def generation_settings(args) -> GenerationSettings:
    return GenerationSettings.for_model(args.model, args.n_per_question, args.max_new_tokens, args.temperature, top_p=args.top_p,
                                        batch_size=args.batch_size, seed=args.seed, dtype=args.dtype)


def add_eval_args(parser: argparse.ArgumentParser, output_required: bool = True) -> None:
    add_generation_args(parser)
    parser.add_argument("--trait", required=True)
    if output_required:
        parser.add_argument("--output_path", required=True, help="CSV; a .summary.json and a .manifest.json are written beside it")
    parser.add_argument("--judge", default=None, help="openai | hf:<model> | offline (default: openai if OPENAI_API_KEY is set, else offline)")
    parser.add_argument("--judge_model", default=DEFAULT_OPENAI_JUDGE)
    parser.add_argument("--judge_data", default=None,
                        help="offline judge: its own data folder (default persona_loras/<model>/<trait>/judge_data, "
                             "written by extract_persona_lora.py)")
    parser.add_argument("--adapter", default=None,
                        help="a finetune of --model to evaluate: a PEFT adapter folder or a full checkpoint folder")
    parser.add_argument("--fewshot", type=non_negative_int, default=None,
                        help="demonstrations before prompted answers (default: the extraction profile's, 4 embedded, 0 otherwise)")
    parser.add_argument("--no_margin", action="store_true",
                        help="judged runs: skip the judge-free log-likelihood margin (reference answers scored under every "
                             "condition; on by default)")
    parser.add_argument("--margin", action="store_true",
                        help="A/B runs: measure the judge-free margin beside the forced choices too (off by default there: "
                             "it generates the reference answers, which costs far more than scoring the items)")
    parser.add_argument("--ab_data", default=None,
                        help="forced-choice mode: score the A/B items of this file (the public format of Anthropic's "
                             "model-written evaluations / CAA) under every condition instead of generating and judging")
    parser.add_argument("--ab_system_prompt", default=None, help="A/B mode: a system prompt before each item (default none)")


def default_fewshot(model: str | None, trait: Trait) -> int:
    """The small profile elicits with 4 demonstrations (a 135M model barely follows a system prompt
    alone; see the README), real models with the system prompt only, as Persona Vectors does."""
    return min(4, pool_size(trait)) if is_embedded(model) else 0


def prepare_evaluation(args, output_path: str | Path | None = None, output_flag: str = "--output_path",
                       mode: str | None = None) -> EvalRun:
    """Check every input before any model loads: the model path, the trait, the output location
    (writable, not being written by another run), the adapter, the A/B file and the judge.
    mode "ab" (forced choice) or "judged"; default: "ab" when --ab_data is given."""
    mode = mode or ("ab" if args.ab_data else "judged")
    check_model_source(args.model)
    check_dtype(args.dtype)
    trait = load_trait(args.trait)
    output_path = Path(output_path or args.output_path)
    if output_path.suffix.lower() != ".csv":
        raise PersonaLoRAError(f"{output_flag} {output_path} must end in .csv")
    fewshot = default_fewshot(args.model, trait) if args.fewshot is None else args.fewshot
    check_fewshot(trait, fewshot)
    if args.adapter:
        check_finetune_folder(args.adapter)
    if args.margin and args.no_margin:
        raise PersonaLoRAError("--margin and --no_margin contradict each other: give one")
    # An A/B run costs what scoring its items costs unless the margin is asked for; a judged run
    # measures it unless told not to (generating its answers already dominates the cost).
    margin = args.margin if mode == "ab" else not args.no_margin
    run = EvalRun(trait, generation_settings(args), output_path, dict(vars(args)), adapter=args.adapter, fewshot=fewshot,
                  margin=margin, ab_system_prompt=args.ab_system_prompt)
    if mode == "ab":
        if getattr(args, "persona_instruction_type", None):
            raise PersonaLoRAError("--persona_instruction_type is for generated answers; in A/B mode give the prompt with "
                                   "--ab_system_prompt")
        run.ab_items, run.ab_path = load_ab_items(args.ab_data), args.ab_data
    elif args.judge and args.judge.startswith("hf:") and model_label(args.judge[3:]) == model_label(args.model):
        raise PersonaLoRAError(f"--judge {args.judge} is the model under test: a model would judge its own steered answers; "
                               "choose another judge model")
    check_writable(output_path, output_flag)  # last of the checks: a refused run leaves no folder behind
    # The lock before the judge, whose making takes seconds (a second writer is refused at once),
    # and released if the judge cannot be made (a refused run leaves no lock behind).
    run.lock = OutputLock(output_path, output_flag).__enter__()
    if mode != "ab":
        try:
            run.judge = make_judge(args.judge, trait, args.judge_model,
                                   args.judge_data or str(default_judge_data_dir(args.model, args.trait)))
        except BaseException:
            run.lock.__exit__(None, None, None)
            raise
    return run


# ---------------------------------------------------------------------------------------------
# The model under evaluation and finetunes as conditions
# ---------------------------------------------------------------------------------------------


def check_coefficients(model_name: str | None, dtype: str, diffs: list, coefficients: list[list[float]], flag: str) -> None:
    """Refuse, before the model loads, a diff that does not fit the model's checkpoint or a
    coefficient too large for its weights (lora_utils.check_coefficient_size), reading the weights'
    norms through memory maps. `coefficients[i]` are the coefficients diff i is merged at."""
    check_model_source(model_name)  # an empty --model folder is named as such, not as a missing checkpoint
    checkpoint = lu.SafetensorsCheckpoint(resolve_model_folder(model_name))
    for diff, values in zip(diffs, coefficients):
        lu.check_diff_fits(diff, checkpoint, values, flag, dtype=resolve_dtype(dtype))


def check_finetune_folder(path: str) -> None:
    folder = Path(path)
    if not ((folder / "adapter_config.json").is_file() or (folder / "model.safetensors").is_file()
            or (folder / "model.safetensors.index.json").is_file()):
        raise PersonaLoRAError(f"--adapter {path} is neither a PEFT adapter folder (adapter_config.json) nor a full "
                               "checkpoint (model.safetensors)")


def finetune_steer(model, path: str) -> Callable[[], contextlib.AbstractContextManager]:
    """The finetune at `path` as a condition on the loaded base model: a LoRA adapter is merged as
    its exact update s·B·A, a full checkpoint's tensors are swapped in; restored afterwards, so
    the same process can also measure the base model. Refused here, before any generation, if it
    is a finetune of another model."""
    if (Path(path) / "adapter_config.json").is_file():
        update = lu.load_adapter_update(path)
        lu.LoRAMerger(model).check(update)
        return lambda: lu.LoRASteerer(model, update, 1.0)
    checkpoint = lu.SafetensorsCheckpoint(Path(path))
    lu.CheckpointSwap(model, checkpoint).check()
    return lambda: lu.CheckpointSwap(model, checkpoint)


def finetune_identity(path: str) -> dict:
    folder = Path(path)
    weights = sorted(folder.glob("adapter_model.*")) or sorted(folder.glob("*.safetensors"))
    return {"path": str(folder), "sha256": [file_identity(w)["sha256"] for w in weights]}


def on_finetune(run: EvalRun, model, conditions: list[Condition]) -> list[Condition]:
    """With --adapter, the same conditions with the finetune merged under each (the finetune
    first, any steering on top); the unsteered condition is then the finetune, and says so."""
    if not run.adapter:
        return conditions
    steer_finetune, identity = finetune_steer(model, run.adapter), {"finetune": finetune_identity(run.adapter)}

    def on_top(inner):
        def steer():
            stack = contextlib.ExitStack()
            stack.enter_context(steer_finetune())
            stack.enter_context(inner())
            return stack
        return steer

    wrapped = []
    for c in conditions:
        name, method = ("finetune", "finetune") if c.method == "baseline" else (c.name, c.method)
        wrapped.append(Condition(name, method, c.coef, on_top(c.steer), c.instruction_type, {**c.identity, **identity}, c.coefs))
    return wrapped


def load_eval_model(run: EvalRun):
    model, tokenizer = load_model_and_tokenizer(run.settings.model, dtype=run.settings.dtype)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# Answers
# ---------------------------------------------------------------------------------------------


def evaluation_jobs(trait: Trait, n_per_question: int, instruction_type: str | None, fewshot: int = 0) -> list[dict]:
    """The held-out questions, n_per_question samples each; prompted (pos/neg) when asked."""
    if instruction_type:
        return prompted_jobs(trait, trait.evaluation_questions, instruction_type, n_per_question=n_per_question,
                             fewshot=fewshot, stage="evaluation", every_instruction=False)
    return [{"id": f"q{index}-s{sample}", "question_id": f"{trait.name}_{index}", "system": None,
             "messages": [{"role": "user", "content": question}]}
            for index, question in enumerate(trait.evaluation_questions) for sample in range(n_per_question)]


def generate_condition(run: EvalRun, model, tokenizer, condition: Condition, folder: Path, stream: str | None = None) -> list[dict]:
    """Answers for one condition, resumable: finished work files are reused, partial ones continued.
    The file's key holds everything the answers depend on (settings with the resolved dtype, the
    trait file, the condition and what it steers with). Sampled from the run's --seed, or from
    `stream` (eval.generation.SEED_STREAMS) for answers that must not share the conditions' noise."""
    settings = run.settings
    seed = settings.seed if stream is None else stream_seed(stream, settings.seed)
    fewshot = run.fewshot if condition.instruction_type else 0
    identity = answers_identity(settings, model.dtype, seed,
                                trait=hashlib.sha256(run.trait.path.read_bytes()).hexdigest(), condition=condition.name,
                                instruction_type=condition.instruction_type, fewshot=fewshot, **condition.identity)
    jobs = evaluation_jobs(run.trait, settings.n_per_question, condition.instruction_type, fewshot)
    return cached_generation(model, tokenizer, jobs, folder / f"{condition.name}-{identity_key(identity)}.jsonl", settings,
                             seed=seed, desc=f"generating {condition.name}", identity=identity,
                             while_generating=condition.steer)


def reference_answers(run: EvalRun, model, tokenizer) -> dict[str, list[dict]]:
    """The judge-free margin's references: the unsteered base model's answers to the held-out
    questions under the trait's pos and neg prompts (with the run's demonstrations), each side from
    its own seed stream. Shared by every run writing beside this output (a folder .references/), so
    the finetunes of one experiment are measured against the same answers."""
    folder = run.output_path.parent / ".references"
    references = {}
    for side in SIDES:
        condition = Condition(f"{run.trait.name}_prompted_{side}", "system_prompt", instruction_type=side)
        with OutputLock(folder / f"{run.trait.name}-{side}", "the reference answers"):
            references[side] = generate_condition(run, model, tokenizer, condition, folder, stream=f"reference_{side}")
    return references


def question_margins(model, tokenizer, references: dict[str, list[dict]]) -> dict[str, float]:
    """Per question: the mean log-probability per token the model gives the pos references minus
    the neg ones, teacher-forced without the prompt that elicited them. Steering toward the trait
    raises it; no sampling noise in the steered model, and no judge."""
    # One call for both sides: a question's pos and neg answers share its prompt, which the scorer then reads once.
    scores = response_log_likelihoods(model, tokenizer, [[r["messages"][0], r["messages"][-1]]
                                                         for records in references.values() for r in records])
    per_side, offset = {}, 0
    for side, records in references.items():
        per_side[side] = cluster_means(scores[offset:offset + len(records)], [r["question_id"] for r in records])
        offset += len(records)
    return {q: per_side["pos"][q] - per_side["neg"][q] for q in per_side["pos"] if q in per_side["neg"]}


def references_digest(references: dict[str, list[dict]]) -> str:
    """Which reference answers a margin was measured on: runs pair their margins only on the same."""
    return hashlib.sha256(json.dumps(references, sort_keys=True).encode()).hexdigest()


def condition_margins(run: EvalRun, model, tokenizer, condition: Condition, references, folder: Path) -> dict[str, float]:
    """question_margins under the condition, kept once computed (keyed by what they depend on)."""
    identity = {"references": references_digest(references), "dtype": str(model.dtype),
                "model_files": model_identity(run.settings.model), "condition": condition.name, **condition.identity}
    path = folder / f"margins-{condition.name}-{identity_key(identity)}.json"
    if path.is_file():
        with contextlib.suppress(PersonaLoRAError):
            return read_json_object(path, "margins")
    with condition.steer(), STAGES.stage(f"margin {condition.name}", "answers") as work:
        margins = question_margins(model, tokenizer, references)
        work["count"] = sum(len(records) for records in references.values())
    write_json(path, margins)
    return margins


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def run_evaluation(run: EvalRun, conditions: list[Condition], model, tokenizer) -> EvalResult:
    """Every condition on the one loaded model, then the outputs. The output's lock, taken by
    prepare_evaluation, is released once they are written (a second run writing the same output
    was refused meanwhile)."""
    with run.lock or OutputLock(run.output_path, "--output_path"):
        ab = run.ab_items is not None
        work_dir = run.output_path.parent / f".{run.output_path.stem}.work"
        frame, summary, generated = (_measure_ab if ab else _measure_judged)(run, conditions, model, tokenizer, work_dir)
        with atomic_path(run.output_path) as tmp:
            frame.to_csv(tmp, index=False)
        write_json(run.output_path.with_suffix(".summary.json"), summary)
        write_manifest(run.output_path.parent, run.arguments, run.started, name=f"{run.output_path.stem}.manifest.json",
                       outputs={"csv": str(run.output_path)}, **({"ab_data": run.ab_path} if ab else {"judge": run.judge.name}))
        (print_ab_table if ab else print_table)(summary)
        return EvalResult(frame, summary, generated)


def judge_free_margins(run: EvalRun, conditions: list[Condition], model, tokenizer, work_dir: Path) -> tuple[dict, dict | None]:
    """({condition: {question: margin}}, the reference answers) when the run measures the margin.
    A prompted condition answers under a system prompt the references are not scored with: its
    margin would be the unprompted model's, so it gets none."""
    if not run.margin:
        return {}, None
    references = reference_answers(run, model, tokenizer)
    return {c.name: condition_margins(run, model, tokenizer, c, references, work_dir) for c in conditions
            if not c.instruction_type}, references


def composition_columns(conditions: list[Condition]) -> list[str]:
    return list(dict.fromkeys(f"coef_{k}" for c in conditions for k in (c.coefs or {})))


def baseline_of(conditions: list[Condition]) -> Condition | None:
    """The unsteered condition of a run (the baseline, a zero coefficient, a composition of zeros),
    against which the others are paired."""
    def unsteered(c: Condition) -> bool:
        if c.method == "baseline":
            return True
        return c.method in ("lora", "activation", "lora_composed") and c.coef == 0 and not any((c.coefs or {}).values())

    return next((c for c in conditions if unsteered(c)), None)


def _measure_judged(run: EvalRun, conditions: list[Condition], model, tokenizer, work_dir: Path):
    import pandas as pd

    trait = run.trait
    generated = {c.name: generate_condition(run, model, tokenizer, c, work_dir) for c in conditions}
    margins, references = judge_free_margins(run, conditions, model, tokenizer, work_dir)

    rows = []
    for condition in conditions:
        for record in generated[condition.name]:
            question = record["messages"][0]["content"]
            prompt = tokenizer.apply_chat_template(conversation(record)[:-1], tokenize=False, add_generation_prompt=True)
            rows.append({"question_id": record["question_id"], "question": question, "prompt": prompt,
                         "answer": record["messages"][-1]["content"], "coef": condition.coef, "method": condition.method,
                         "condition": condition.name, **{f"coef_{k}": c for k, c in (condition.coefs or {}).items()}})
    questions, answers = [r["question"] for r in rows], [r["answer"] for r in rows]
    trait_scores = run.judge.score("trait", questions, answers, desc=f"judging {trait.name}")
    coherence = run.judge.score("coherence", questions, answers, desc="judging coherence")
    for row, trait_score, coherence_score in zip(rows, trait_scores, coherence):
        row[trait.name], row["coherence"] = trait_score, coherence_score

    frame = pd.DataFrame(rows)[CSV_COLUMNS_BEFORE_TRAIT + [trait.name] + CSV_COLUMNS_AFTER_TRAIT + composition_columns(conditions)]
    summary = judged_summary(run, conditions, rows, margins)
    summary["references_sha256"] = references_digest(references) if references else None
    return frame, summary, generated


def judged_summary(run: EvalRun, conditions: list[Condition], rows: list[dict], margins: dict) -> dict:
    """Per condition: trait score, coherence and margin with errors clustered by question (each
    question's samples averaged first), the per-question means (so other runs on the same
    questions and seeds can pair with them), and changes against the run's unsteered condition,
    paired by question."""
    trait = run.trait.name
    judge = run.judge.report()
    summary = {"trait": trait, "model": model_label(run.settings.model), "adapter": run.adapter, "judge": judge["name"],
               "judge_description": judge["description"], "judge_quality": judge["quality"],
               "judge_failures": judge["failures"], "judge_warnings": judge["warnings"], "csv": str(run.output_path),
               "settings": run.settings.identity(), "fewshot": run.fewshot,
               "errors": "standard errors clustered by question (per-question means, then their spread over questions); "
                         "changes against the unsteered condition are paired by question",
               "margin_measure": MARGIN_MEASURE if margins else None,
               "conditions": []}
    for condition in conditions:
        members = [r for r in rows if r["condition"] == condition.name]
        clusters = [r["question_id"] for r in members]
        entry = {"condition": condition.name, "method": condition.method, "coef": condition.coef, "answers": len(members)}
        for metric in (trait, "coherence"):
            values = [r[metric] for r in members]
            mean, sem, n = clustered_mean_and_sem(values, clusters)
            entry.update({f"{metric}_mean": mean, f"{metric}_sem": sem, f"{metric}_by_question": cluster_means(values, clusters)})
            entry["questions"] = n
        # The trait among coherent answers only: at strong steering a degenerate answer gets whatever
        # score the judge gives nonsense, which can move the mean by itself.
        coherent = [r for r in members if r["coherence"] is not None and r["coherence"] >= COHERENT]
        mean, sem, n = clustered_mean_and_sem([r[trait] for r in coherent], [r["question_id"] for r in coherent])
        entry.update({f"{trait}_mean_coherent": mean, f"{trait}_sem_coherent": sem, "coherent_answers": len(coherent)})
        entry["refusals"] = sum(1 for r in members if r[trait] is None or r["coherence"] is None)
        entry["missing"] = sum(1 for r in members if _failed(r[trait]) or _failed(r["coherence"]))
        if condition.name in margins:
            mean, sem, _ = mean_and_sem(margins[condition.name].values())
            entry.update(margin_mean=mean, margin_sem=sem, margin_by_question=margins[condition.name])
        if condition.coefs:
            entry["coefs"] = condition.coefs
        summary["conditions"].append(entry)
    baseline = next((e for e, c in zip(summary["conditions"], conditions) if c is baseline_of(conditions)), None)
    if baseline is not None:
        for entry in summary["conditions"]:
            if entry is not baseline:
                entry["change_vs_baseline"] = paired_changes(entry, baseline, trait)
    return summary


def paired_changes(entry: dict, baseline: dict, trait: str) -> dict:
    """entry − baseline for the trait score, coherence and margin, paired by question."""
    changes = {"baseline": baseline["condition"]}
    for metric in (trait, "coherence", "margin"):
        if f"{metric}_by_question" in entry and f"{metric}_by_question" in baseline:
            mean, sem, n = paired_difference(entry[f"{metric}_by_question"], baseline[f"{metric}_by_question"])
            changes.update({metric: mean, f"{metric}_sem": sem, "questions": n})
    return changes


def _failed(score) -> bool:
    """NaN marks an answer the judge could not score at all (None is a refusal)."""
    return score is not None and score != score


def print_table(summary: dict) -> None:
    trait = summary["trait"]
    print(f"\n{trait} on {summary['model']} — judge: {summary['judge_description']}")
    print("(± standard errors clustered by question; margin: judge-free, nats/token)")
    width = max([28] + [len(c["condition"]) for c in summary["conditions"]])
    print(f"{'condition':{width}s} {'method':13s} {'coef':>6s} {'n':>4s} {trait:>16s} {'coherence':>16s} {'margin':>18s} {'missing':>7s}")
    for c in summary["conditions"]:
        margin = f"{c['margin_mean']:+8.4f} ± {c['margin_sem']:.4f}" if "margin_mean" in c else f"{'—':>18s}"
        print(f"{c['condition']:{width}s} {c['method']:13s} {c['coef']:6.2f} {c['answers']:4d} "
              f"{c[f'{trait}_mean']:8.2f} ± {c[f'{trait}_sem']:5.2f} {c['coherence_mean']:8.2f} ± {c['coherence_sem']:5.2f} "
              f"{margin} {c['missing'] + c['refusals']:7d}")


# ---------------------------------------------------------------------------------------------
# Forced choice (A/B)
# ---------------------------------------------------------------------------------------------


def _measure_ab(run: EvalRun, conditions: list[Condition], model, tokenizer, work_dir: Path):
    """Forced choices under every condition, and beside them (with --margin) the judge-free
    log-likelihood margin: both measures without a judge, in one run."""
    import pandas as pd

    scored = []
    for condition in conditions:
        with condition.steer(), STAGES.stage(f"A/B {condition.name}", "items") as work:
            rows = score_ab_items(model, tokenizer, run.ab_items, run.ab_system_prompt)
            work["count"] = len(rows)
        scored.append({"name": condition.name, "method": condition.method, "coef": condition.coef, "coefs": condition.coefs,
                       "rows": rows})
    margins, _ = judge_free_margins(run, conditions, model, tokenizer, work_dir)
    table = []
    for condition in scored:
        for item, row in zip(run.ab_items, condition["rows"]):
            table.append({"question_id": row["question_id"], "question": item.question, "coef": condition["coef"],
                          "method": condition["method"], "p_matching": row["p_matching"],
                          "p_matching_swapped": row.get("p_matching_swapped"), "p_first": row["p_first"],
                          "p_first_swapped": row.get("p_first_swapped"), "choice_log_mass": row["choice_log_mass"],
                          **{f"coef_{k}": c for k, c in (condition["coefs"] or {}).items()}})
    frame = pd.DataFrame(table)[AB_CSV_COLUMNS + composition_columns(conditions)]
    return frame, ab_summary(run, scored, margins), None


def ab_summary(run: EvalRun, scored: list[dict], margins: dict[str, dict[str, float]]) -> dict:
    swappable = sum(item.swapped is not None for item in run.ab_items)
    conditions = summarize_conditions(scored)
    for entry in conditions:
        if entry["condition"] in margins:
            by_question = margins[entry["condition"]]
            mean, sem, _ = mean_and_sem(by_question.values())
            entry.update(margin_mean=mean, margin_sem=sem, margin_by_question=by_question)
    baseline = next((e for e in conditions if "change_vs_baseline" in e and e["condition"] == e["change_vs_baseline"]["baseline"]),
                    None)
    if baseline is not None and margins:
        for entry in conditions:
            entry["change_vs_baseline"].update(zip(("margin", "margin_sem"),
                                                   paired_difference(entry["margin_by_question"], baseline["margin_by_question"])[:2]))
    margin_slopes = {}
    for method in {c["method"] for c in scored if c["method"] not in ("baseline", "finetune") and not c.get("coefs")}:
        members = [e for e in conditions if e["method"] == method or e is baseline]
        if margins and len({e["coef"] for e in members}) > 1:
            margin_slopes[method] = paired_slope([e["coef"] for e in members], [e["margin_by_question"] for e in members])
    slopes = method_slopes(scored)
    family = [*slopes.values(), *margin_slopes.values()]
    for slope, adjusted in zip(family, holm([slope["p"] for slope in family])):
        slope.update(p_holm=adjusted, p_holm_family=f"Holm over this run's {len(family)} A/B and margin slopes")
    return {"trait": run.trait.name, "model": model_label(run.settings.model), "adapter": run.adapter, "mode": "ab",
            "ab_data": run.ab_path, "ab_data_sha256": file_identity(run.ab_path)["sha256"], "items": len(run.ab_items),
            "items_scored_both_orders": swappable,
            "system_prompt": run.ab_system_prompt, "csv": str(run.output_path),
            "measure": "p_matching = P(matching answer) / (P(matching) + P(other)), exact teacher-forced probabilities of the "
                       "whole answer strings; balanced = items with the matching answer first and second weighted equally; "
                       "both_orders = each item averaged with its choices swapped",
            "margin_measure": MARGIN_MEASURE if margins else None,
            "errors": "changes against the unsteered condition and slopes are paired by item (A/B) and by question (margin)",
            "conditions": conditions, "slopes": slopes, "margin_slopes": margin_slopes}


def measurement_identity(summary: dict) -> dict:
    """What makes measures from two evaluation summaries comparable: for A/B runs the A/B file's
    content and item count, for judged runs the judge, the generation settings and the margin's
    reference answers. A drift subtracts, and a correlation lines up, measures of several runs:
    those must agree (the file path alone would not: a rewritten file keeps its name)."""
    if summary.get("mode") == "ab":
        return {"kind": "ab", "ab_data_sha256": summary.get("ab_data_sha256"), "items": summary.get("items")}
    return {"kind": "judged", "judge": summary.get("judge"), "settings": summary.get("settings"),
            "references_sha256": summary.get("references_sha256")}


def require_same_measurement(identities: dict[str, dict], what: str) -> None:
    """Refuse, naming both and what differs, when `identities` ({name: measurement_identity}) disagree."""
    first_name, first = next(iter(identities.items()))
    for name, identity in identities.items():
        if identity != first:
            differing = sorted(k for k in identity if identity.get(k) != first.get(k))
            raise PersonaLoRAError(f"{what}: {name} was measured differently from {first_name} ({', '.join(differing)}); "
                                   "rerun them with one judge, one set of generation settings and one set of reference "
                                   "answers (or one A/B file)")


def print_ab_table(summary: dict) -> None:
    print(f"\n{summary['trait']} A/B on {summary['model']} — {summary['items']} items of {summary['ab_data']} "
          f"({summary['items_scored_both_orders']} also scored with the choices swapped); no judge")
    width = max([24] + [len(c["condition"]) for c in summary["conditions"]])
    print(f"{'condition':{width}s} {'method':13s} {'coef':>6s} {'balanced p':>10s} {'both orders':>11s} {'change (paired)':>18s} "
          f"{'P(first)':>9s} {'log P(m)+P(n)':>13s}")
    for c in summary["conditions"]:
        change = c.get("change_vs_baseline")
        paired = (f"{change['balanced_p_matching_both_orders']:+8.3f} ± {change['balanced_p_matching_both_orders_sem']:.3f}"
                  if change else f"{'—':>18s}")
        print(f"{c['condition']:{width}s} {c['method']:13s} {c['coef']:6.2f} {c['balanced_p_matching']:10.3f} "
              f"{c['balanced_p_matching_both_orders']:11.3f} {paired} {c['p_first_choice']:9.3f} {c['choice_log_mass']:13.2f}")
    for method, slope in summary["slopes"].items():
        print(f"slope per unit coefficient ({method}): {slope['slope']:+.4f} ± {slope['slope_sem']:.4f} (paired by item), "
              f"p {slope['p']:.2g}, Holm {slope['p_holm']:.2g}")
    for method, slope in summary["margin_slopes"].items():
        print(f"judge-free margin slope ({method}): {slope['slope']:+.4f} ± {slope['slope_sem']:.4f} nats/token per unit "
              f"(paired by question), p {slope['p']:.2g}, Holm {slope['p_holm']:.2g}")
