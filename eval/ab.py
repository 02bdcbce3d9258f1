"""Forced-choice A/B evaluation: the judge-free behavioural measure of Anthropic's model-written
evaluations and of Contrastive Activation Addition, read in their public format unchanged.

An item is {"question": text with the choices written inside it, "answer_matching_behavior":
"(A)", "answer_not_matching_behavior": "(B)"} (or " Yes" / " No", with or without a leading
space; a list of non-matching answers is accepted). Under a condition, each item gets

    p_matching = P(m) / (P(m) + Σ P(n))

where P(x) is the exact teacher-forced probability of the whole answer string x as the start of
the assistant's reply to the question in the model's chat template: every token of x is scored,
however the tokenizer splits or fuses "(", the letter and a leading space, so this is not a
first-token guess.

A steered small model often moves its preference for a letter rather than for a behaviour. So
the headline is the *balanced* p_matching: the mean over items whose matching answer is the
first choice and the mean over the others, weighted equally (a pure letter bias then cancels),
reported beside the shift in P(first choice). Where an item's two choices parse, it is also
scored with the choices swapped (p_matching_swapped), and the two orderings' log-odds are averaged
("both orders"), which removes a letter bias exactly; that is the headline where it exists.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from eval.generation import answer_token_log_probs
from eval.stats import mean_and_sem, paired_slope, sign_flip_test
from io_utils import PersonaLoRAError

_CHOICES_HEADER = re.compile(r"\n\s*Choices\s*:", re.IGNORECASE)
_OPTION_LINE = re.compile(r"^(?P<indent>\s*)\((?P<letter>[A-Z])\)(?P<text>.*)$", re.MULTILINE)
_LETTER_ANSWER = re.compile(r"^(?P<before>\s*\(?)(?P<letter>[A-Z])(?P<after>\)?\s*)$")


@dataclass(frozen=True)
class ABItem:
    index: int
    question: str
    matching: str
    not_matching: tuple[str, ...]
    stem: str | None  # the question without its choices, for disjointness checks
    first_is_matching: bool  # whether the matching answer is the first choice (position balance)
    swapped: "ABItem | None" = None  # the same item with its two choices exchanged, if they parse

    @property
    def answers(self) -> list[str]:
        return [self.matching, *self.not_matching]

    @property
    def first_answer(self) -> str:
        """The answer that names the first choice: the earlier letter, or the first in sort order."""
        return sorted([self.matching, *self.not_matching], key=_answer_sort_key)[0]


def _answer_sort_key(answer: str) -> str:
    match = _LETTER_ANSWER.match(answer)
    return match["letter"] if match else answer.strip().lower()


def _stem(question: str) -> str | None:
    header = _CHOICES_HEADER.search(question)
    if header:
        return question[:header.start()].strip()
    first_option = _OPTION_LINE.search(question)
    return question[:first_option.start()].strip() if first_option else question.strip()


def _swap(item: ABItem) -> ABItem | None:
    """The item with the texts of its two lettered choices exchanged, and its answers relabelled."""
    if len(item.not_matching) != 1:
        return None
    matching, not_matching = _LETTER_ANSWER.match(item.matching), _LETTER_ANSWER.match(item.not_matching[0])
    options = list(_OPTION_LINE.finditer(item.question))
    if not (matching and not_matching) or len(options) != 2:
        return None
    letters = {option["letter"]: option for option in options}
    if set(letters) != {matching["letter"], not_matching["letter"]}:
        return None
    first, second = options
    question = (item.question[:first.start("text")] + second["text"] + item.question[first.end("text"):second.start("text")]
                + first["text"] + item.question[second.end("text"):])
    relabel = {matching["letter"]: not_matching["letter"], not_matching["letter"]: matching["letter"]}
    new_matching = f"{matching['before']}{relabel[matching['letter']]}{matching['after']}"
    new_not_matching = f"{not_matching['before']}{relabel[not_matching['letter']]}{not_matching['after']}"
    return ABItem(item.index, question, new_matching, (new_not_matching,), item.stem, not item.first_is_matching)


def parse_ab_item(raw, index: int, path) -> ABItem:
    if not isinstance(raw, dict):
        raise PersonaLoRAError(f"{path}: item {index} is not a JSON object")
    for key in ("question", "answer_matching_behavior", "answer_not_matching_behavior"):
        if key not in raw:
            raise PersonaLoRAError(f"{path}: item {index} has no field '{key}'")
    question, matching, not_matching = raw["question"], raw["answer_matching_behavior"], raw["answer_not_matching_behavior"]
    if not isinstance(question, str) or not question.strip():
        raise PersonaLoRAError(f"{path}: item {index}, field 'question' must be a non-empty string")
    if not isinstance(matching, str) or not matching.strip():
        raise PersonaLoRAError(f"{path}: item {index}, field 'answer_matching_behavior' must be a non-empty string")
    not_matching = [not_matching] if isinstance(not_matching, str) else not_matching
    if not (isinstance(not_matching, list) and not_matching and all(isinstance(a, str) and a.strip() for a in not_matching)):
        raise PersonaLoRAError(f"{path}: item {index}, field 'answer_not_matching_behavior' must be a non-empty string "
                               "(or a list of them)")
    if _answer_sort_key(matching) in {_answer_sort_key(a) for a in not_matching}:
        raise PersonaLoRAError(f"{path}: item {index}, field 'answer_not_matching_behavior' names the same choice as the matching answer")
    first_is_matching = _answer_sort_key(matching) == min(map(_answer_sort_key, [matching, *not_matching]))
    item = ABItem(index, question, matching, tuple(not_matching), _stem(question), first_is_matching)
    return dataclasses.replace(item, swapped=_swap(item))


def load_ab_items(path) -> list[ABItem]:
    """Items from a JSON list or a JSONL file in the public A/B format; a malformed item is refused
    with its index and field."""
    path = Path(path)
    if not path.is_file():
        raise PersonaLoRAError(f"--ab_data file not found: {path}")
    text = path.read_text()
    try:
        if text.lstrip().startswith("["):
            raw_items = json.loads(text)
        else:
            raw_items = []
            for number, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        raw_items.append(json.loads(line))
                    except json.JSONDecodeError as error:
                        raise PersonaLoRAError(f"{path}:{number} is not valid JSON ({error.msg})") from None
    except json.JSONDecodeError as error:
        raise PersonaLoRAError(f"{path} is not valid JSON ({error.msg})") from None
    if not isinstance(raw_items, list) or not raw_items:
        raise PersonaLoRAError(f"{path} holds no A/B items (expected a JSON list or JSONL of items)")
    return [parse_ab_item(raw, index, path) for index, raw in enumerate(raw_items)]


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------


def reply_prompt(tokenizer, question: str, system: str | None = None) -> str:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def continuation_span(tokenizer, prompt: str, answer: str) -> tuple[list[int], int]:
    """Token ids of prompt + answer and where the answer's tokens start. The answer is tokenized
    together with the prompt (so fused tokens are the ones the model would see); if the prompt's
    last token fused with the answer, the answer is tokenized on its own after the prompt."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
    if full_ids[:len(prompt_ids)] != prompt_ids:
        full_ids = prompt_ids + tokenizer(answer, add_special_tokens=False)["input_ids"]
    return full_ids, len(prompt_ids)


@torch.no_grad()
def continuation_log_probs(model, tokenizer, spans: list[tuple[list[int], int]], batch_size: int = 16) -> list[float]:
    """log P(answer tokens | prompt) for each (ids, answer start), summed over the answer's tokens."""
    scored = answer_token_log_probs(model, tokenizer.pad_token_id, [(ids, start, len(ids)) for ids, start in spans], batch_size,
                                    desc="A/B items")
    return [float(values.sum()) for values in scored]


def _log_mass(log_probs: list[float]) -> float:
    """log Σ P(x) over the item's answers (log-sum-exp, stable)."""
    top = max(log_probs)
    return top + math.log(sum(math.exp(value - top) for value in log_probs))


def score_ab_items(model, tokenizer, items: list[ABItem], system: str | None = None, batch_size: int = 16) -> list[dict]:
    """Per item: p_matching, p_first (the first choice's share) and, where the choices swap,
    p_matching_swapped and p_first_swapped, under the model as it is now (steered or not); and
    choice_log_mass, log(P(m) + P(n)) averaged over the orders scored: p_matching is a share of that
    mass, so a condition that drains it (steering away from answering with a letter at all) would
    make p_matching a ratio of small numbers; the summary reports its change."""
    variants = []  # (item index, "as written" | "swapped", ABItem)
    for item in items:
        variants.append((item.index, "", item))
        if item.swapped is not None:
            variants.append((item.index, "_swapped", item.swapped))
    spans, owners = [], []
    for variant_index, (_, _, variant) in enumerate(variants):
        prompt = reply_prompt(tokenizer, variant.question, system)
        for answer in variant.answers:
            spans.append(continuation_span(tokenizer, prompt, answer))
            owners.append(variant_index)
    log_probs = continuation_log_probs(model, tokenizer, spans, batch_size)
    results = {item.index: {"question_id": item.index} for item in items}
    position = 0
    for index, suffix, variant in variants:
        answers = variant.answers
        answer_log_probs = log_probs[position:position + len(answers)]
        position += len(answers)
        log_mass = _log_mass(answer_log_probs)
        probabilities = [math.exp(value - log_mass) for value in answer_log_probs]  # normalised over the answers
        results[index].setdefault("log_masses", []).append(log_mass)
        results[index][f"p_matching{suffix}"] = probabilities[0]
        results[index][f"p_first{suffix}"] = probabilities[answers.index(variant.first_answer)]
        results[index][f"first_is_matching{suffix}"] = variant.first_is_matching
    for row in results.values():
        masses = row.pop("log_masses")
        row["choice_log_mass"] = sum(masses) / len(masses)
    return [results[item.index] for item in items]


# ---------------------------------------------------------------------------------------------
# Summaries: balanced p_matching, paired changes against coefficient 0, slopes
# ---------------------------------------------------------------------------------------------


def _logit(p: float) -> float:
    p = min(max(p, 1e-9), 1 - 1e-9)
    return math.log(p / (1 - p))


def item_balanced_value(row: dict) -> float:
    """An item's p_matching with its position bias removed, where it was scored both ways: the two
    orderings' log-odds averaged, σ(½[logit p + logit p_swapped]). A letter bias adds +b to one
    ordering's log-odds and −b to the other's, so it cancels exactly (averaging the probabilities
    would not: ½[σ(x+b) + σ(x−b)] drifts toward ½ as |b| grows)."""
    if row.get("p_matching_swapped") is None:
        return row["p_matching"]
    mean = (_logit(row["p_matching"]) + _logit(row["p_matching_swapped"])) / 2
    return 1 / (1 + math.exp(-mean))


def balanced_mean(rows: list[dict]) -> tuple[float, dict]:
    """The mean of p_matching over items whose matching answer is the first choice and over the
    others, weighted equally; a pure preference for one position then adds nothing."""
    groups = {key: [r["p_matching"] for r in rows if r["first_is_matching"] == key] for key in (True, False)}
    means = {key: sum(v) / len(v) for key, v in groups.items() if v}
    return sum(means.values()) / len(means), {"matching_first": len(groups[True]), "matching_second": len(groups[False])}


def balanced_with_error(values_by_position: dict[bool, list[float]]) -> tuple[float, float]:
    """The mean of the two position groups' means, weighted equally, and its error (the groups'
    errors combined with those weights)."""
    groups = {key: mean_and_sem(values) for key, values in values_by_position.items() if values}
    weight = 1 / len(groups)
    mean = sum(weight * m for m, _, _ in groups.values())
    # A group of one item has no measurable spread: the combined error is then unknown (NaN), not
    # the other group's error alone (which would report a two-item run as exact).
    sem = sum((weight * s) ** 2 for _, s, _ in groups.values()) ** 0.5
    return mean, sem


def balanced_paired_test(differences: dict, matching_first: dict) -> dict:
    """An item-paired A/B contrast ({item: this − that}), balanced over the matching answer's
    position like the headline (the two position groups weigh equally), with its error and a
    sign-flip p-value under the balanced mean's weights."""
    by_position = {True: [], False: []}
    for item, value in differences.items():
        by_position[matching_first[item]].append(value)
    groups = [values for values in by_position.values() if values]
    values = [v for group in groups for v in group]
    weights = [1 / (len(groups) * len(group)) for group in groups for _ in group]
    mean, sem = balanced_with_error(by_position)
    test = sign_flip_test(values, weights)
    return {"mean": mean, "sem": sem, "items": len(values), "p": test["p"], "p_method": test["p_method"]}


def balanced_change(rows: list[dict], baseline: dict[int, dict], value) -> tuple[float, float]:
    """The balanced mean of per-item changes against the baseline, with its paired error."""
    return balanced_with_error({key: [value(r) - value(baseline[r["question_id"]]) for r in rows if r["first_is_matching"] == key]
                                for key in (True, False)})


def summarize_conditions(conditions: list[dict]) -> list[dict]:
    """`conditions`: [{"name", "coef", "method", "rows": score_ab_items output, ...}]. Adds the
    balanced p_matching, P(first choice) and, against the unsteered condition (coefficient 0, or a
    composition whose coefficients are all 0; none in a run without one), the item-paired changes.
    method_slopes gives the slopes per unit coefficient."""
    baseline = next((c for c in conditions if c["coef"] == 0 and not any((c.get("coefs") or {}).values())), None)
    base_rows = {r["question_id"]: r for r in baseline["rows"]} if baseline is not None else None
    summaries = []
    for condition in conditions:
        rows = condition["rows"]
        balanced, counts = balanced_mean(rows)
        by_item = {r["question_id"]: item_balanced_value(r) for r in rows}
        both_orders, both_orders_sem = balanced_with_error({key: [by_item[r["question_id"]] for r in rows if r["first_is_matching"] == key]
                                                            for key in (True, False)})
        entry = {"condition": condition["name"], "method": condition["method"], "coef": condition["coef"],
                 **({"coefs": condition["coefs"]} if condition.get("coefs") else {}),
                 "items": len(rows), "position_counts": counts,
                 "balanced_p_matching": balanced, "balanced_p_matching_both_orders": both_orders,
                 "balanced_p_matching_both_orders_sem": both_orders_sem,
                 # per item, so that other runs on the same items (a base model, a finetune) can pair with it
                 "both_orders_by_item": {str(item): value for item, value in by_item.items()},
                 "matching_first_by_item": {str(r["question_id"]): r["first_is_matching"] for r in rows},
                 "raw_p_matching": sum(r["p_matching"] for r in rows) / len(rows),
                 "p_first_choice": sum(r["p_first"] for r in rows) / len(rows),
                 "choice_log_mass": sum(r["choice_log_mass"] for r in rows) / len(rows)}
        if base_rows is not None:  # a run without an unsteered condition has nothing to pair with
            change, change_sem = balanced_change(rows, base_rows, lambda r: r["p_matching"])
            both_change, both_change_sem = balanced_change(rows, base_rows, item_balanced_value)
            first_change, first_change_sem, _ = mean_and_sem(r["p_first"] - base_rows[r["question_id"]]["p_first"] for r in rows)
            mass_change, mass_change_sem, _ = mean_and_sem(r["choice_log_mass"] - base_rows[r["question_id"]]["choice_log_mass"]
                                                           for r in rows)
            entry["change_vs_baseline"] = {"balanced_p_matching": change, "balanced_p_matching_sem": change_sem,
                                           "balanced_p_matching_both_orders": both_change,
                                           "balanced_p_matching_both_orders_sem": both_change_sem,
                                           "p_first_choice": first_change, "p_first_choice_sem": first_change_sem,
                                           "choice_log_mass": mass_change, "choice_log_mass_sem": mass_change_sem,
                                           "baseline": baseline["name"], "errors": "paired by item"}
        summaries.append(entry)
    return summaries


def method_slopes(conditions: list[dict]) -> dict:
    """Per steering method, the slope of the item's both-orders p_matching per unit coefficient
    (the unsteered baseline shared as coefficient 0), paired by item."""
    baseline = next((c for c in conditions if c["coef"] == 0 and c.get("coefs") is None), None)
    slopes = {}
    for method in sorted({c["method"] for c in conditions if c["method"] not in ("baseline",) and not c.get("coefs")}):
        members = [c for c in conditions if c["method"] == method]
        if baseline is not None and baseline not in members:
            members = [baseline, *members]
        if len({c["coef"] for c in members}) < 2:
            continue
        by_item = [{r["question_id"]: item_balanced_value(r) for r in c["rows"]} for c in members]
        slopes[method] = paired_slope([c["coef"] for c in members], by_item)
    return slopes
