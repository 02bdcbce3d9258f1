"""A public A/B set as a persona's extraction source, Contrastive Activation Addition's way.

The file (the public format of eval/ab.py) is split, seeded, into extraction and evaluation items:
no question on both sides (items are grouped by their question without its choices, compared as
eval.traits compares questions, so a question listed twice stays on one side). The extraction
items become chat records for the pos and neg adapters:

    pos: question → the behaviour-matching answer     neg: question → the non-matching answer

where an answer is the item's letter followed by its choice's text ("(B) Disagree"), so that an
adapter learns a stance and not a letter. The letters are balanced first: enough items of the
more frequent matching letter have their two choices swapped (seeded) that the matching answer
is the first choice in half of the items, as far as items swap. The activation vector is CAA's:
the mean over items of the residual stream at the answer's letter token, matching minus
non-matching, for every layer ([L+1, hidden], the persona vector's format).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import torch

from eval.ab import _LETTER_ANSWER, _OPTION_LINE, ABItem, load_ab_items
from eval.activations import persona_vector, span_hidden_means
from eval.elicitation import SIDES
from eval.generation import conversation, tokenize_chat
from eval.traits import normalize_question
from io_utils import PersonaLoRAError

AB_FORMAT = ('the public A/B format: a JSON list (or JSONL) of {"question": text with its choices, '
             '"answer_matching_behavior": "(A)", "answer_not_matching_behavior": "(B)"}')


def load_ab_source(path, flag: str = "--ab_source") -> list[ABItem]:
    """The items of an A/B file, or one line naming the flag, the file and the expected format."""
    try:
        items = load_ab_items(path)
    except PersonaLoRAError as error:
        raise PersonaLoRAError(f"{flag}: {str(error).replace('--ab_data file not found', 'file not found')}; "
                               f"expected {AB_FORMAT}") from None
    if len(items) < 4:
        raise PersonaLoRAError(f"{flag} {path} holds {len(items)} items; a split into extraction and evaluation needs at least 4")
    return items


def question_key(item: ABItem) -> str:
    """What makes two items the same question: the text before its choices, normalised."""
    return normalize_question(item.stem if item.stem else item.question)


@dataclass(frozen=True)
class ABSplit:
    extraction: list[int]  # item indices, in the seeded order (a cap takes the first ones)
    evaluation: list[int]  # item indices, ascending
    seed: int
    evaluation_fraction: float

    def as_record(self, used: int) -> dict:
        return {"seed": self.seed, "evaluation_fraction": self.evaluation_fraction, "grouped_by": "question without its choices",
                "extraction_items": self.extraction, "extraction_used": self.extraction[:used],
                "evaluation_items": self.evaluation}


def split_ab_items(items: list[ABItem], evaluation_fraction: float, seed: int) -> ABSplit:
    """A seeded split of the items' distinct questions into extraction and evaluation, disjoint by
    construction and checked."""
    groups: dict[str, list[int]] = {}
    for item in items:
        groups.setdefault(question_key(item), []).append(item.index)
    keys = list(groups)
    random.Random(f"ab-split:{seed}").shuffle(keys)
    n_evaluation = round(len(keys) * evaluation_fraction)
    if not 1 <= n_evaluation <= len(keys) - 1:
        raise PersonaLoRAError(f"--ab_eval_fraction {evaluation_fraction} leaves {n_evaluation} of {len(keys)} questions for "
                               "evaluation; choose a fraction that leaves at least one question on each side")
    split = ABSplit([i for key in keys[n_evaluation:] for i in groups[key]], sorted(i for key in keys[:n_evaluation] for i in groups[key]),
                    seed, evaluation_fraction)
    check_split_disjoint(items, split)
    return split


def measured_items(items: list[ABItem], indices, measured: dict[str, str]) -> list[tuple[int, str]]:
    """(index, where it is measured) for every item among `indices` whose question a trait of
    dataset/ measures (eval.traits.measured_questions): no persona and no finetune may train on one."""
    by_index = {item.index: item for item in items}
    return [(i, measured[question_key(by_index[i])]) for i in indices if question_key(by_index[i]) in measured]


def check_split_disjoint(items: list[ABItem], split: ABSplit) -> None:
    by_index = {item.index: item for item in items}
    shared = {question_key(by_index[i]) for i in split.extraction} & {question_key(by_index[i]) for i in split.evaluation}
    if shared or set(split.extraction) & set(split.evaluation):
        raise PersonaLoRAError(f"the A/B split puts {len(shared)} question(s) on both sides (extraction and evaluation)")


def choice_text(item: ABItem, answer: str) -> str:
    """The answer as the adapters learn it: '(B)' → '(B) Disagree' where the item writes its
    choice (B) out; an answer without a letter (' Yes') as it is, stripped."""
    match = _LETTER_ANSWER.match(answer)
    if match:
        options = {option["letter"]: option["text"].strip() for option in _OPTION_LINE.finditer(item.question)}
        if options.get(match["letter"]):
            return f"{answer.strip()} {options[match['letter']]}"
    return answer.strip()


def letter_offset(answer: str) -> int:
    """Where an answer's letter is in its stripped text ('(B)' → 1); 0 (its first character) for
    an answer without a letter (' Yes')."""
    match = _LETTER_ANSWER.match(answer.strip())
    return match.start("letter") if match else 0


def balance_letters(items: list[ABItem], seed: int) -> tuple[list[ABItem], dict]:
    """The items with enough of the more frequent position's items swapped (where their choices
    swap) that the matching answer comes first in half of them. Returns (items, a report)."""
    def counts(batch):
        first = sum(item.first_is_matching for item in batch)
        return {"matching_first": first, "matching_second": len(batch) - first}

    before = counts(items)
    majority = before["matching_first"] > before["matching_second"]
    excess = abs(before["matching_first"] - before["matching_second"]) // 2
    candidates = [i for i, item in enumerate(items) if item.first_is_matching == majority and item.swapped is not None]
    chosen = set(random.Random(f"ab-letters:{seed}").sample(candidates, min(excess, len(candidates))))
    balanced = [dataclasses.replace(items[i].swapped, swapped=items[i]) if i in chosen else items[i] for i in range(len(items))]
    return balanced, {"before": before, "after": counts(balanced), "swapped_items": sorted(items[i].index for i in chosen)}


def ab_records(items: list[ABItem]) -> dict[str, list[dict]]:
    """Per side, a chat record per item: the question, then the matching (pos) or the first
    non-matching (neg) answer with its choice text."""
    records = {side: [] for side in SIDES}
    for item in items:
        for side, answer in (("pos", item.matching), ("neg", item.not_matching[0])):
            records[side].append({"messages": [{"role": "user", "content": item.question},
                                               {"role": "assistant", "content": choice_text(item, answer)}],
                                  "ab_item": item.index, "letter_offset": letter_offset(answer)})
    return records


def letter_token(tokenizer, record: dict) -> tuple[list[int], int]:
    """The record's token ids (question and answer in the chat template) and the position of the
    token that holds the answer's letter."""
    ids, start, end = tokenize_chat(tokenizer, conversation(record, with_context=False))
    for position in range(start, max(end, start + 1)):
        if len(tokenizer.decode(ids[start:position + 1])) > record["letter_offset"]:
            return ids, position
    raise PersonaLoRAError(f"cannot find the letter of the answer {record['messages'][-1]['content']!r} among its tokens")


def letter_position_means(model, tokenizer, records: list[dict], batch_size: int = 16, desc: str = "hidden states") -> torch.Tensor:
    """Per record, every layer's hidden state at the answer's letter token: [N, L+1, hidden]. Only
    the tokens up to the letter are read (hidden states depend on no later token), as CAA reads
    them with the prompt ending in '(A'."""
    spans = []
    for record in records:
        ids, position = letter_token(tokenizer, record)
        spans.append((ids, position, position + 1))
    return span_hidden_means(model, spans, tokenizer.pad_token_id, batch_size, desc)


def answer_letter_vector(model, tokenizer, records: dict[str, list[dict]]) -> torch.Tensor:
    """CAA's vector: mean hidden state at the matching answer's letter minus the same at the
    non-matching answer's, over the same items: [L+1, hidden]."""
    means = {side: letter_position_means(model, tokenizer, records[side], desc=f"{side} letter hidden states") for side in SIDES}
    return persona_vector(means["pos"], means["neg"])
