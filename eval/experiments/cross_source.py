"""Two sources, one direction? A trait's persona diff extracted from its prompts (the base model
answering under the trait's pos/neg system prompts) and from its public A/B set (CAA's items,
written by others), cross-evaluated and compared by what they do.

Behaviour. Both diffs are merged at +1 and at 0 in one run per test set, so every contrast pairs:
- the public set's held-out items (balanced p_matching, both orders): no item the A/B diff trained
  on (the split groups identical questions), none the prompt diff saw — the one measure
  independent of the prompt source. Held out by question, not by template: public sets reuse
  templates (CAA's sycophancy items pair a few claims with many biographies), so a held-out item
  can share its claim with a training item; these items are the A/B diff's home ground as the
  judged questions are the prompt diff's;
- the trait's own A/B items (written here: a second source, not the extraction's);
- the trait's evaluation questions: the judged score and the judge-free margin (the prompt
  source's instruments: the margin's references are the base model under the trait's prompts).
Per test set: each diff's change against the unsteered model, and prompt − A/B (their +1
conditions against each other: a contrast at each diff's own scale, not in calibrated units),
paired by item or question with sign-flip p-values; Holm over every test of the table (the
contrasts and the similarity's null tests).

Function. Two LoRA diffs from independent initialisations (each source has its own stream) have a
whole-space weight cosine of ~0 whatever they learned, so they are compared by what they do on
held-out inputs:
- the data-weighted inner product ⟨ΔW₁, ΔW₂⟩_Σ = Σ_m tr(ΔW₁,m Σ_m ΔW₂,mᵀ), Σ_m the second moment of
  module m's inputs over held-out answer tokens, i.e. the mean over those tokens of Σ_m ⟨ΔW₁x, ΔW₂x⟩:
  do the two updates write the same outputs for the inputs they meet? Per input set (the public
  items' answers; the unsteered model's answers to the evaluation questions) and pooled. Its cosine
  is set against a null of random low-rank diffs with the other diff's per-module ranks, each
  module scaled to that diff's data-weighted norm (z-score and the two-sided share of draws at
  least as far from 0), and beside other traits' diffs (a stronger null: every persona LoRA also
  learns the answers' style);
- the residual-stream change each causes at the steered layer on the same tokens
  (eval.activations.functional_comparison).
Σ_m is never formed: each diff's (and each draw's) A·x is accumulated, so the memory is the
factors' and the draws' down factors (draws × rank × in per module).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

import lora_utils as lu
from eval.ab import ABItem
from eval.ab_source import choice_text
from eval.activations import decoder_layers, functional_comparison, pad_right
from eval.generation import tokenize_chat
from eval.stats import holm, paired_difference, sign_flip_test
from io_utils import PersonaLoRAError, read_json_object
from model_loading import model_device

NULL_STREAM = "cross-source-null"  # the random draws' stream (lora_utils.null_down / null_up)
SOURCES = ("prompt", "ab")  # the order of the diffs in every run: prompt-derived first
CONDITIONS = {"unsteered": (0.0, 0.0), "prompt": (1.0, 0.0), "ab": (0.0, 1.0)}
TEST_SETS = {
    "public_ab": "the public set's held-out items (balanced p_matching, both orders)",
    "own_ab": "the trait's own A/B items, written here (balanced p_matching, both orders)",
    "judged": "the trait's evaluation questions, judged score",
    "margin": "the trait's evaluation questions, judge-free log-likelihood margin (nats/token)",
}


# ---------------------------------------------------------------------------------------------
# Held-out inputs
# ---------------------------------------------------------------------------------------------


def heldout_spans(tokenizer, ab_items: list[ABItem], answers: list[dict], max_length: int = 512) -> dict[str, list[tuple]]:
    """(token ids, answer start, answer end) of held-out inputs in the chat template without a
    system prompt, in two sets: "public_items", each public held-out item with its matching and its
    non-matching answer (letter and choice text), and "evaluation_answers", each (question, answer)
    of `answers` (the unsteered model's answers to the evaluation questions)."""
    def span(question: str, answer: str) -> tuple:
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return tuple(tokenize_chat(tokenizer, messages, max_length))

    sets = {"public_items": [span(item.question, choice_text(item, answer)) for item in ab_items
                             for answer in (item.matching, item.not_matching[0])],
            "evaluation_answers": [span(row["question"], row["answer"]) for row in answers]}
    return {name: [s for s in spans if s[2] > s[1]] for name, spans in sets.items()}


# ---------------------------------------------------------------------------------------------
# Data-weighted geometry of low-rank diffs
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def weighted_geometry(model, span_sets: dict[str, list[tuple]], pad_id: int, diffs: dict[str, lu.PersonaLoRADiff],
                      null_like: dict[str, str] | None = None, draws: int = 100, seed: int = 0, batch_size: int = 8,
                      label: str = "") -> dict:
    """The data-weighted inner products ⟨ΔW_a, ΔW_b⟩_Σ for every pair of the named `diffs` (and
    each with itself), Σ_m the second moment of module m's inputs over the answer tokens of a set of
    spans; for each named set of `span_sets` and for all of them pooled (token-weighted).

    null_like: {against: like}: `draws` random diffs with `like`'s per-module ranks, each module
    scaled to `like`'s data-weighted norm there (the statistic is data-weighted, so the null has the
    diff's size where it is measured), each paired with `against`: the cosine of `against` with
    each draw is the null of cos(against, like). Draws come from seeded generators per module
    (null_down/null_up, stream `label`/like). Returns {set: {"inner": {(a, b): value}, "null":
    {against: [cosines]}, "tokens": n}} with the pooled one under "all".

    Per module and batch, only the projections P = X·Aᵀ of the tokens' inputs X onto every diff's
    down factor (and every draw's) are formed, and their Grams accumulated; ⟨B_a A_a, B_b A_b⟩_Σ =
    sum((B_aᵀB_b) ⊙ (P_aᵀP_b)) / n at the end. Memory: the diffs' factors, the Grams, and one
    module's draws at a time (regenerated per batch from their generators)."""
    null_like = null_like or {}
    for against, like in null_like.items():
        if against not in diffs or like not in diffs:
            raise PersonaLoRAError(f"a null of {against} against draws like {like}: both must be among the diffs")
    names, sets = list(diffs), list(span_sets)
    modules = sorted({m for d in diffs.values() for m in d.module_names})
    device = model_device(model)
    state: dict = {"mask": None, "set": None}
    grams, handles = {}, []

    for module in modules:
        owners = [n for n in names if module in diffs[n]]
        offsets, at = {}, 0
        for n in owners:
            offsets[n] = (at, at + diffs[n].rank(module))
            at += diffs[n].rank(module)
        groups = [{"against": against, "like": like, "rank": diffs[like].rank(module),
                   "cross": dict.fromkeys(sets, 0.0), "self": dict.fromkeys(sets, 0.0)}
                  for against, like in null_like.items() if module in diffs[like] and against in owners]
        grams[module] = {"owners": owners, "offsets": offsets, "gram": dict.fromkeys(sets, 0.0), "nulls": groups,
                         "downs": torch.cat([diffs[n].factors[module][1].float() for n in owners]).to(device)}

        def read(layer_module, inputs, module=module):
            x = inputs[0][state["mask"]].float()
            if not len(x):
                return
            entry, name = grams[module], state["set"]
            projected = (x @ entry["downs"].T).double()
            entry["gram"][name] = entry["gram"][name] + projected.T @ projected
            for group in entry["nulls"]:
                # The draws' down factors are regenerated from their seeded generator at each batch
                # rather than kept: kept for every module they take draws × rank × in floats per
                # module and null (by arithmetic, ~19 GB for 1,000 draws of rank 16 over the embedded model's 210 modules).
                down = lu.null_down(diffs[group["like"]].shape(module), group["rank"], draws, seed, module,
                                    f"{label}/{group['like']}", NULL_STREAM).flatten(0, 1).to(x.device)
                drawn = (x @ down.T).double()  # [n, draws·rank]
                lo, hi = entry["offsets"][group["against"]]
                group["cross"][name] = group["cross"][name] + projected[:, lo:hi].T @ drawn
                per_draw = drawn.view(len(x), -1, group["rank"])
                group["self"][name] = group["self"][name] + torch.einsum("ndr,nds->drs", per_draw, per_draw)

        handles.append(model.get_submodule(module.removesuffix(".weight")).register_forward_pre_hook(read))

    tokens = dict.fromkeys(sets, 0)
    try:
        for name, spans in span_sets.items():
            state["set"] = name
            for start in tqdm(range(0, len(spans), batch_size), desc=f"data-weighted inner products ({name})", leave=False):
                batch = spans[start:start + batch_size]
                input_ids, attention_mask = pad_right([list(ids[:end]) for ids, _, end in batch], pad_id)
                mask = torch.zeros(input_ids.shape, dtype=torch.bool)
                for row, (_, answer_start, answer_end) in enumerate(batch):
                    mask[row, answer_start:answer_end] = True
                state["mask"] = mask.to(device)
                tokens[name] += int(mask.sum())
                model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    empty = [name for name in sets if not tokens[name]]
    if empty:
        raise PersonaLoRAError(f"the held-out inputs {', '.join(empty)} hold no answer tokens to weigh the diffs with")

    def pooled(per_set: dict):  # token-weighted: the sums over all sets' tokens
        return sum(per_set.values())

    results = {}
    for name in [*sets, "all"]:
        n = sum(tokens.values()) if name == "all" else tokens[name]
        pick = pooled if name == "all" else (lambda per_set, name=name: per_set[name])
        inner = {(a, b): 0.0 for i, a in enumerate(names) for b in names[i:]}
        null_inner = {against: torch.zeros(draws, dtype=torch.float64) for against in null_like}
        for module in modules:
            entry = grams[module]
            gram = pick(entry["gram"]).cpu()
            ups = {o: diffs[o].factors[module][0].double() for o in entry["owners"]}
            own = {}
            for (a, b) in inner:
                if a in ups and b in ups:
                    (la, ha), (lb, hb) = entry["offsets"][a], entry["offsets"][b]
                    own[(a, b)] = float(((ups[a].T @ ups[b]) * gram[la:ha, lb:hb]).sum()) / n
                    inner[(a, b)] += own[(a, b)]
            for group in entry["nulls"]:
                like, against = group["like"], group["against"]
                up = lu.null_up(diffs[like].shape(module), group["rank"], draws, seed, module, f"{label}/{like}", NULL_STREAM).double()
                self_norms = torch.einsum("dor,dos,drs->d", up, up, pick(group["self"]).cpu()) / n
                scale = (max(own[tuple(sorted((like, like)))], 0.0) / self_norms.clamp_min(1e-300)).sqrt()
                cross = pick(group["cross"]).cpu().view(len(ups[against].T), draws, group["rank"])  # [r_against, draws, r]
                null_inner[against] += scale * torch.einsum("or,dos,rds->d", ups[against], up, cross) / n
        # each draw has `like`'s data-weighted norm in every module, so its whole norm is `like`'s
        nulls = {against: (null_inner[against] / math.sqrt(max(inner[(against, against)], 0.0) * max(inner[(like, like)], 0.0))
                           ).tolist() for against, like in null_like.items()}
        results[name] = {"inner": inner, "null": nulls, "tokens": n}
    return results


def weighted_cosine(inner: dict, a: str, b: str) -> float:
    value = inner[(a, b)] if (a, b) in inner else inner[(b, a)]
    return value / math.sqrt(max(inner[(a, a)], 0.0) * max(inner[(b, b)], 0.0) + 1e-300)


def functional_similarity(model, tokenizer, span_sets: dict[str, list[tuple]], diffs: dict[str, lu.PersonaLoRADiff], layer: int,
                          draws: int = 100, seed: int = 0, batch_size: int = 8, label: str = "") -> dict:
    """The prompt and the A/B diff (the first two of `diffs`, in SOURCES order; the rest are other
    traits' diffs) compared on held-out inputs, per input set and pooled: their data-weighted
    cosine against random draws matched to each (both ways) and beside the other traits' diffs;
    and, on all inputs, the residual-stream change each causes at `layer` (every diff merged at +1,
    so only the blocks below `layer` act on it)."""
    prompt, ab = SOURCES
    if list(diffs)[:2] != [prompt, ab]:
        raise PersonaLoRAError("functional_similarity: the diffs must start with 'prompt' and 'ab'")
    geometry = weighted_geometry(model, span_sets, tokenizer.pad_token_id, diffs, {prompt: ab, ab: prompt}, draws, seed,
                                 batch_size, label)
    comparators = [n for n in diffs if n not in SOURCES]

    def report(result: dict) -> dict:
        inner = result["inner"]
        return {"tokens": result["tokens"], "weighted_cosine": weighted_cosine(inner, prompt, ab),
                "null_random": {f"{a} vs draws like {b}": lu.against_null(weighted_cosine(inner, a, b), result["null"][a])
                                for a, b in ((prompt, ab), (ab, prompt))},
                "comparators": {name: {"cosine_with_prompt": weighted_cosine(inner, prompt, name),
                                       "cosine_with_ab": weighted_cosine(inner, ab, name)} for name in comparators},
                "weighted_norms": {name: math.sqrt(max(inner[(name, name)], 0.0)) for name in diffs}}

    def merged(diff):
        return lambda: lu.LoRASteerer(model, diff, 1.0)

    every_span = [span for spans in span_sets.values() for span in spans]
    residual = functional_comparison(model, every_span, tokenizer.pad_token_id, layer, {n: merged(d) for n, d in diffs.items()},
                                     batch_size)
    return {
        **report(geometry["all"]), "spans": {name: len(spans) for name, spans in span_sets.items()},
        "by_input": {name: report(geometry[name]) for name in span_sets},
        "null_description": f"{draws} random low-rank diffs with the other diff's per-module ranks, each module scaled to that "
                            f"diff's data-weighted norm there (Gaussian factors, stream {NULL_STREAM!r}/{label}, seed {seed}), "
                            "each set against one source's diff",
        "weight_cosine": diffs[prompt].cosine(diffs[ab]),
        "residual_stream": {"layer": layer, "coefficients": "every diff merged at +1 (the blocks below the layer act on it)",
                            "pairs": residual},
    }


# ---------------------------------------------------------------------------------------------
# Behaviour: the cross-evaluation table
# ---------------------------------------------------------------------------------------------


def _conditions_by_source(summary: dict, path: Path) -> dict[str, dict]:
    """The unsteered, prompt-at-+1 and A/B-at-+1 conditions of a two-diff run (coefficients in
    groups 0 0, 1 0, 0 1: the prompt diff first)."""
    found = {}
    for entry in summary.get("conditions", []):
        coefs = tuple(float(c) for c in (entry.get("coefs") or {}).values())
        for name, wanted in CONDITIONS.items():
            if coefs == wanted:
                found[name] = entry
    missing = [name for name in CONDITIONS if name not in found]
    if missing:
        raise PersonaLoRAError(f"{path} lacks the condition(s) {', '.join(missing)}: run eval_lora_persona.py with "
                               "--lora_diff_path PROMPT_DIFF AB_DIFF --lora_coef 0 0 1 0 0 1")
    return found


def _paired(treated: dict, control: dict, matching_first: dict | None = None) -> dict:
    """treated − control per item or question, with its error and sign-flip p; for A/B items the
    two positions of the matching answer weigh equally (the balanced mean)."""
    if matching_first is not None:
        from eval.ab import balanced_paired_test

        return balanced_paired_test({k: treated[k] - control[k] for k in treated if k in control}, matching_first)
    mean, sem, n = paired_difference(treated, control)
    test = sign_flip_test([treated[k] - control[k] for k in treated if k in control])
    return {"mean": mean, "sem": sem, "items": n, "p": test["p"], "p_method": test["p_method"]}


SIMILARITY_KEYS = ("weighted_cosine", "null_random", "comparators", "weight_cosine", "residual_stream", "by_input", "diffs")


def read_similarity(path: Path) -> dict:
    report = read_json_object(path, "similarity report")
    missing = [key for key in SIMILARITY_KEYS if key not in report]
    if missing:
        raise PersonaLoRAError(f"{path} lacks {', '.join(missing)}: rerun scripts/cross_source.py similarity with this version")
    return report


def check_same_diffs(path: Path, diffs: dict) -> None:
    """A run's manifest must name the similarity report's two diffs, prompt-derived first: the
    table's columns are read by position."""
    manifest = read_json_object(path.with_name(path.name.replace(".summary.json", ".manifest.json")), "run manifest")
    used = (manifest.get("arguments") or {}).get("lora_diff_path") or []
    wanted = [diffs["prompt"], diffs["ab"]]
    if [str(Path(p)) for p in used] != [str(Path(p)) for p in wanted]:
        raise PersonaLoRAError(f"{path} was run with --lora_diff_path {' '.join(map(str, used))}, not the prompt-derived and "
                               f"A/B-derived diffs of the similarity report ({' '.join(wanted)}), in that order")


def trait_contrasts(output_dir: Path, trait: str, diffs: dict | None = None) -> dict:
    """One trait's three contrasts (prompt diff vs unsteered, A/B diff vs unsteered, prompt vs A/B)
    on each test set, from the run summaries the driver writes; with `diffs` ({"prompt": path,
    "ab": path}), each run's manifest must name them in that order."""
    rows = {}
    for test_set, (file, by, positions) in {
        "public_ab": (f"public_ab_{trait}.summary.json", "both_orders_by_item", True),
        "own_ab": (f"own_ab_{trait}.summary.json", "both_orders_by_item", True),
        "judged": (f"judged_{trait}.summary.json", f"{trait}_by_question", False),
        "margin": (f"judged_{trait}.summary.json", "margin_by_question", False),
    }.items():
        path = output_dir / file
        summary = read_json_object(path, "evaluation summary")
        if diffs is not None:
            check_same_diffs(path, diffs)
        found = _conditions_by_source(summary, path)
        needed = [by, "matching_first_by_item"] if positions else [by]
        lacking = [key for key in needed if key not in found["unsteered"]]
        if lacking:
            raise PersonaLoRAError(f"{path} has no {', '.join(lacking)} per condition; rerun it with this version of "
                                   "eval_lora_persona.py")
        first = found["unsteered"]["matching_first_by_item"] if positions else None
        values = {name: found[name][by] for name in CONDITIONS}
        unsteered = (found["unsteered"]["balanced_p_matching_both_orders"] if positions
                     else sum(values["unsteered"].values()) / len(values["unsteered"]))
        rows[test_set] = {"prompt_vs_unsteered": _paired(values["prompt"], values["unsteered"], first),
                          "ab_vs_unsteered": _paired(values["ab"], values["unsteered"], first),
                          "prompt_vs_ab": _paired(values["prompt"], values["ab"], first),
                          "unsteered_mean": unsteered, "measure": TEST_SETS[test_set]}
        if test_set == "judged":
            rows[test_set]["judge"] = summary.get("judge_description")
            rows[test_set]["judge_quality"] = summary.get("judge_quality")
    return rows


MIN_WORD_GROUP = 5


def answer_word(item: ABItem) -> str:
    """The first word of the item's matching answer as written out ('(B) Yes, I will' → 'yes')."""
    import re

    text = choice_text(item, item.matching)
    text = re.sub(r"^\(?[A-Za-z]\)\s*", "", text)  # the letter
    words = re.findall(r"[a-z']+", text.lower())
    return words[0] if words else ""


def answer_word_split(output_dir: Path, trait: str, items_path, min_group: int = MIN_WORD_GROUP) -> dict:
    """Each diff's change on the public held-out items, grouped by the first word of the matching
    answer (groups of at least `min_group` items, the rest pooled as 'other'): a diff that moves
    items the same way whatever their trait content, but opposite ways for 'yes' and 'no' (or
    'agree' and 'disagree') answers, has learned the answer's word, not the trait. Descriptive:
    groups are found in the data, so they are kept out of the table's Holm family."""
    from collections import Counter

    from eval.ab_source import load_ab_source

    path = output_dir / f"public_ab_{trait}.summary.json"
    found = _conditions_by_source(read_json_object(path, "evaluation summary"), path)
    words = {str(item.index): answer_word(item) for item in load_ab_source(items_path, "--ab_items")}
    counts = Counter(words.values())
    group_of = {key: word if counts[word] >= min_group else "other" for key, word in words.items()}
    unsteered = found["unsteered"]["both_orders_by_item"]
    report = {}
    for group in sorted(set(group_of.values()), key=lambda g: (g == "other", -sum(v == g for v in group_of.values()))):
        keys = [k for k, g in group_of.items() if g == group and k in unsteered]
        row = {"items": len(keys)}
        for name in ("prompt", "ab"):
            treated = found[name]["both_orders_by_item"]
            mean, sem, _ = paired_difference({k: treated[k] for k in keys}, {k: unsteered[k] for k in keys})
            row[f"{name}_vs_unsteered"] = {"mean": mean, "sem": sem}
        report[group] = row
    return report


def summarize(output_dir: Path, traits: list[str]) -> dict:
    """Every trait's contrasts and functional similarity, Holm-adjusted over every contrast of the table."""
    report = {"traits": {}, "design": __doc__.split("\n\n")[1:3]}
    for trait in traits:
        similarity = read_similarity(output_dir / f"similarity_{trait}.json")
        report["traits"][trait] = {"contrasts": trait_contrasts(output_dir, trait, similarity["diffs"]), "similarity": similarity,
                                   "public_ab_by_answer_word": answer_word_split(output_dir, trait, similarity["inputs"]["ab_items"])}
    family = [contrast for t in report["traits"].values() for row in t["contrasts"].values()
              for key, contrast in row.items() if key.endswith(("_unsteered", "_vs_ab"))]
    nulls = [test for t in report["traits"].values() for test in t["similarity"]["null_random"].values()]
    p_values = [c["p"] for c in family] + [test["p_two_sided"] for test in nulls]  # the null tests are two-sided
    for test, adjusted in zip(family + nulls, holm(p_values)):
        test["p_holm"] = adjusted
    family += nulls
    report["multiplicity"] = (f"Holm over the table's {len(family)} tests: every contrast and each trait's two random-null "
                              "tests of the pooled data-weighted cosine")
    return report


def print_report(report: dict) -> None:
    for trait, entry in report["traits"].items():
        print(f"\n== {trait}: prompt-derived vs A/B-derived persona diff (each at +1; paired errors; Holm over the table) ==")
        print(f"{'test set':10s} {'unsteered':>10s} {'prompt − 0':>24s} {'A/B − 0':>24s} {'prompt − A/B':>24s}")
        for test_set, row in entry["contrasts"].items():
            cells = [f"{row[k]['mean']:+.4f} ± {row[k]['sem']:.4f} ({row[k]['p_holm']:.2g})"
                     for k in ("prompt_vs_unsteered", "ab_vs_unsteered", "prompt_vs_ab")]
            print(f"{test_set:10s} {row['unsteered_mean']:10.4f} " + " ".join(f"{c:>24s}" for c in cells))
        similarity = entry["similarity"]
        nulls = "; ".join(f"{k}: z {v['z']:+.1f}, max |cos| {v['null_max_abs']:.4f}, two-sided p {v['p_two_sided']:.2g} (Holm {v['p_holm']:.2g})"
                          for k, v in similarity["null_random"].items())
        others = ", ".join(f"{k} {v['cosine_with_prompt']:+.4f}/{v['cosine_with_ab']:+.4f}" for k, v in similarity["comparators"].items())
        residual = similarity["residual_stream"]["pairs"].get("prompt vs ab", {})
        per_input = ", ".join(f"{k} {v['weighted_cosine']:+.4f}" for k, v in similarity["by_input"].items())
        print(f"data-weighted cosine {similarity['weighted_cosine']:+.4f} ({per_input}; weight cosine {similarity['weight_cosine']:+.4f}); "
              f"null: {nulls}; other traits (with prompt/with A/B): {others or 'none'}; "
              f"layer {similarity['residual_stream']['layer']} mean-change cosine {residual.get('mean_change_cosine', float('nan')):+.3f}, "
              f"per token {residual.get('per_token_cosine_mean', float('nan')):+.3f}")
        words = "; ".join(f"{word} ({row['items']}): prompt {row['prompt_vs_unsteered']['mean']:+.4f} ± "
                          f"{row['prompt_vs_unsteered']['sem']:.4f}, A/B {row['ab_vs_unsteered']['mean']:+.4f} ± {row['ab_vs_unsteered']['sem']:.4f}"
                          for word, row in entry.get("public_ab_by_answer_word", {}).items())
        print(f"public held-out items by the matching answer's first word (descriptive, outside Holm): {words}")


def plot_report(report: dict, path) -> None:
    """One panel per test set: each trait's change under the prompt diff and under the A/B diff
    (+1 against unsteered), with paired standard errors."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from eval.analysis import save_figure

    traits = list(report["traits"])
    figure, axes = plt.subplots(1, len(TEST_SETS), figsize=(4.2 * len(TEST_SETS), 3.6))
    for axis, (test_set, label) in zip(axes, TEST_SETS.items()):
        for offset, (key, name) in zip((-0.18, 0.18), (("prompt_vs_unsteered", "prompt-derived"), ("ab_vs_unsteered", "A/B-derived"))):
            rows = [report["traits"][t]["contrasts"][test_set][key] for t in traits]
            axis.bar([i + offset for i in range(len(traits))], [r["mean"] for r in rows], width=0.36,
                     yerr=[r["sem"] for r in rows], capsize=3, label=name)
        axis.axhline(0, color="black", linewidth=0.6)
        axis.set_xticks(range(len(traits)), traits)
        axis.set_title(textwrap.fill(label, 42), fontsize=8)  # four panels side by side: long titles would overlap
    axes[0].set_ylabel("change at +1 vs unsteered (± paired s.e.)")
    axes[0].legend(fontsize=8)
    save_figure(figure, path)
