"""Two sources, one direction? A trait's persona diff extracted from its prompts (the base model
answering under the trait's pos/neg system prompts) and from its public A/B set (CAA's items,
written by others), cross-evaluated and compared by what they do.

Behaviour. Both diffs are merged at +1 and at 0 in one run per test set, so every contrast pairs:
- the public set's held-out items (balanced p_matching, both orders; no item was trained on by the
  A/B diff, none seen by the prompt diff) — the one measure independent of the prompt source;
- the trait's own A/B items (written here: a second source, not the extraction's);
- the trait's evaluation questions: the judged score and the judge-free margin (the prompt
  source's instruments).
Per test set: each diff's change against the unsteered model, and prompt − A/B (their +1
conditions against each other), paired by item or question with sign-flip p-values, Holm over
every test of the table.

Function. Two independently initialised LoRA diffs have a whole-space weight cosine of ~0 whatever
they learned, so they are compared by what they do on held-out inputs:
- the data-weighted inner product ⟨ΔW₁, ΔW₂⟩_Σ = Σ_m tr(ΔW₁,m Σ_m ΔW₂,mᵀ), Σ_m the second moment of
  module m's inputs over held-out answer tokens, i.e. the mean over those tokens of Σ_m ⟨ΔW₁x, ΔW₂x⟩:
  do the two updates write the same outputs for the inputs they meet? Its cosine is set against a
  null of random low-rank diffs with the other diff's per-module ranks and Frobenius norms (z-score
  and the share of draws reaching it), and beside other traits' diffs (a stronger null: every
  persona LoRA also learns the answers' style);
- the residual-stream change each causes at the steered layer on the same tokens
  (eval.activations.functional_comparison).
Everything is computed from the factors (Σ_m is never formed: each diff's A·x is accumulated), so
the memory is that of the low-rank factors whatever the model's width.
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


def heldout_spans(tokenizer, ab_items: list[ABItem], answers: list[dict], max_length: int = 512) -> list[tuple]:
    """(token ids, answer start, answer end) of held-out inputs: each public held-out item with its
    matching and its non-matching answer (letter and choice text), and each (question, answer) of
    `answers` (the unsteered model's answers to the evaluation questions), in the chat template
    without a system prompt."""
    spans = []
    for item in ab_items:
        for answer in (item.matching, item.not_matching[0]):
            messages = [{"role": "user", "content": item.question}, {"role": "assistant", "content": choice_text(item, answer)}]
            spans.append(tuple(tokenize_chat(tokenizer, messages, max_length)))
    for row in answers:
        messages = [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}]
        spans.append(tuple(tokenize_chat(tokenizer, messages, max_length)))
    return [span for span in spans if span[2] > span[1]]


# ---------------------------------------------------------------------------------------------
# Data-weighted geometry of low-rank diffs
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def weighted_geometry(model, spans: list[tuple], pad_id: int, diffs: dict[str, lu.PersonaLoRADiff],
                      null_like: dict[str, str] | None = None, draws: int = 100, seed: int = 0, batch_size: int = 8) -> dict:
    """The data-weighted inner products ⟨ΔW_a, ΔW_b⟩_Σ for every pair of the named `diffs` (and
    each with itself), Σ the second moment of each module's inputs over the answer tokens of `spans`.

    null_like: {against: like}: `draws` random diffs with `like`'s per-module ranks and Frobenius
    norms, each paired with `against` (the cosine of `against` with each draw is the null of
    cos(against, like)). Returns {"inner": {(a, b): value}, "null": {against: [cosines]}, "tokens": n}.

    Per module and batch, only the projections P = X·Aᵀ of the tokens' inputs X onto every diff's
    down factor are formed, and their Grams accumulated; ⟨B_a A_a, B_b A_b⟩_Σ = sum((B_aᵀB_b) ⊙
    (P_aᵀP_b)) / n at the end."""
    null_like = null_like or {}
    for against, like in null_like.items():
        if against not in diffs or like not in diffs:
            raise PersonaLoRAError(f"a null of {against} against draws like {like}: both must be among the diffs")
    names = list(diffs)
    modules = sorted({m for d in diffs.values() for m in d.module_names})
    device = model_device(model)
    state: dict = {"mask": None}
    grams, null_grams, handles = {}, {}, []

    for module in modules:
        owners = [n for n in names if module in diffs[n]]
        downs = torch.cat([diffs[n].factors[module][1].float() for n in owners]).to(device)
        offsets, at = {}, 0
        for n in owners:
            offsets[n] = (at, at + diffs[n].rank(module))
            at += diffs[n].rank(module)
        groups = []
        for against, like in null_like.items():
            if module in diffs[like]:  # its norm counts even where `against` is absent (no cross term there)
                down = lu.null_down(diffs[like].shape(module), diffs[like].rank(module), draws, seed, module, like, NULL_STREAM)
                groups.append({"against": against, "like": like, "down": down.flatten(0, 1).to(device),
                               "rank": diffs[like].rank(module), "cross": 0.0, "self": 0.0})
        grams[module] = {"owners": owners, "offsets": offsets, "downs": downs, "gram": 0.0}
        null_grams[module] = groups

        def read(layer_module, inputs, module=module):
            x = inputs[0][state["mask"]].float()
            if not len(x):
                return
            entry = grams[module]
            projected = x @ entry["downs"].T
            entry["gram"] = entry["gram"] + (projected.T.double() @ projected.double())
            for group in null_grams[module]:
                drawn = (x @ group["down"].T).double()  # [n, draws·rank]
                if group["against"] in entry["offsets"]:
                    lo, hi = entry["offsets"][group["against"]]
                    group["cross"] = group["cross"] + projected[:, lo:hi].T.double() @ drawn
                per_draw = drawn.view(len(x), -1, group["rank"])
                group["self"] = group["self"] + torch.einsum("ndr,nds->drs", per_draw, per_draw)

        handles.append(model.get_submodule(module.removesuffix(".weight")).register_forward_pre_hook(read))

    tokens = 0
    try:
        for start in tqdm(range(0, len(spans), batch_size), desc="data-weighted inner products", leave=False):
            batch = spans[start:start + batch_size]
            input_ids, attention_mask = pad_right([list(ids[:end]) for ids, _, end in batch], pad_id)
            mask = torch.zeros(input_ids.shape, dtype=torch.bool)
            for row, (_, answer_start, answer_end) in enumerate(batch):
                mask[row, answer_start:answer_end] = True
            state["mask"] = mask.to(device)
            tokens += int(mask.sum())
            model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    if not tokens:
        raise PersonaLoRAError("the held-out inputs hold no answer tokens to weigh the diffs with")

    inner = {(a, b): 0.0 for i, a in enumerate(names) for b in names[i:]}
    null_inner = {against: torch.zeros(draws, dtype=torch.float64) for against in null_like}
    null_self = {against: torch.zeros(draws, dtype=torch.float64) for against in null_like}
    for module in modules:
        entry = grams[module]
        ups = {n: diffs[n].factors[module][0].double() for n in entry["owners"]}
        for (a, b) in inner:
            if a in ups and b in ups:
                (la, ha), (lb, hb) = entry["offsets"][a], entry["offsets"][b]
                inner[(a, b)] += float(((ups[a].T @ ups[b]) * entry["gram"][la:ha, lb:hb].cpu()).sum()) / tokens
        for group in null_grams[module]:
            like, against = group["like"], group["against"]
            up = lu.null_up(diffs[like].shape(module), group["rank"], draws, seed, module, like, NULL_STREAM)
            scale = lu.null_scales(up, group["down"].cpu().view(draws, group["rank"], -1), diffs[like].module_norm(module))
            up = up.double()
            if against in ups:
                cross = group["cross"].cpu().view(len(ups[against].T), draws, group["rank"])  # [r_against, draws, r]
                null_inner[against] += scale * torch.einsum("or,dos,rds->d", ups[against], up, cross) / tokens
            null_self[against] += scale ** 2 * torch.einsum("dor,dos,drs->d", up, up, group["self"].cpu()) / tokens
    nulls = {}
    for against in null_like:
        own = inner[(against, against)]
        nulls[against] = (null_inner[against] / (math.sqrt(max(own, 0.0)) * null_self[against].clamp_min(1e-300).sqrt())).tolist()
    return {"inner": inner, "null": nulls, "tokens": tokens}


def weighted_cosine(inner: dict, a: str, b: str) -> float:
    value = inner[(a, b)] if (a, b) in inner else inner[(b, a)]
    return value / math.sqrt(max(inner[(a, a)], 0.0) * max(inner[(b, b)], 0.0) + 1e-300)


def functional_similarity(model, tokenizer, spans: list[tuple], diffs: dict[str, lu.PersonaLoRADiff], layer: int,
                          draws: int = 100, seed: int = 0, batch_size: int = 8) -> dict:
    """The prompt and the A/B diff (the first two of `diffs`, in SOURCES order; the rest are other
    traits' diffs) compared on held-out inputs: their data-weighted cosine against random matched
    draws (both ways) and against the other traits' diffs, and the residual-stream change each
    causes at `layer` (every diff merged at +1)."""
    prompt, ab = SOURCES
    if list(diffs)[:2] != [prompt, ab]:
        raise PersonaLoRAError("functional_similarity: the diffs must start with 'prompt' and 'ab'")
    geometry = weighted_geometry(model, spans, tokenizer.pad_token_id, diffs, {prompt: ab, ab: prompt}, draws, seed, batch_size)
    inner = geometry["inner"]
    observed = weighted_cosine(inner, prompt, ab)
    comparators = [n for n in diffs if n not in SOURCES]
    def merged(diff):
        return lambda: lu.LoRASteerer(model, diff, 1.0)

    residual = functional_comparison(model, spans, tokenizer.pad_token_id, layer, {n: merged(d) for n, d in diffs.items()}, batch_size)
    return {
        "tokens": geometry["tokens"], "spans": len(spans),
        "weighted_cosine": observed,
        "null_random": {f"{a} vs draws like {b}": lu.against_null(weighted_cosine(inner, a, b), geometry["null"][a])
                        for a, b in ((prompt, ab), (ab, prompt))},
        "null_description": f"{draws} random low-rank diffs with the other diff's per-module ranks and Frobenius norms "
                            f"(Gaussian factors, stream {NULL_STREAM!r}, seed {seed}), each set against one source's diff",
        "comparators": {name: {"cosine_with_prompt": weighted_cosine(inner, prompt, name), "cosine_with_ab": weighted_cosine(inner, ab, name)}
                        for name in comparators},
        "weight_cosine": diffs[prompt].cosine(diffs[ab]),
        "weighted_norms": {name: math.sqrt(max(inner[(name, name)], 0.0)) for name in diffs},
        "residual_stream": {"layer": layer, "coefficients": "every diff merged at +1", "pairs": residual},
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


def trait_contrasts(output_dir: Path, trait: str) -> dict:
    """One trait's three contrasts (prompt diff vs unsteered, A/B diff vs unsteered, prompt vs A/B)
    on each test set, from the run summaries the driver writes."""
    rows = {}
    for test_set, (file, by, positions) in {
        "public_ab": (f"public_ab_{trait}.summary.json", "both_orders_by_item", True),
        "own_ab": (f"own_ab_{trait}.summary.json", "both_orders_by_item", True),
        "judged": (f"judged_{trait}.summary.json", f"{trait}_by_question", False),
        "margin": (f"judged_{trait}.summary.json", "margin_by_question", False),
    }.items():
        path = output_dir / file
        summary = read_json_object(path, "evaluation summary")
        found = _conditions_by_source(summary, path)
        if by not in found["unsteered"]:
            raise PersonaLoRAError(f"{path} has no {by} per condition; rerun it with this version of eval_lora_persona.py")
        first = found["unsteered"].get("matching_first_by_item") if positions else None
        values = {name: found[name][by] for name in CONDITIONS}
        rows[test_set] = {"prompt_vs_unsteered": _paired(values["prompt"], values["unsteered"], first),
                          "ab_vs_unsteered": _paired(values["ab"], values["unsteered"], first),
                          "prompt_vs_ab": _paired(values["prompt"], values["ab"], first),
                          "unsteered_mean": sum(values["unsteered"].values()) / len(values["unsteered"]),
                          "measure": TEST_SETS[test_set]}
        if test_set == "judged":
            rows[test_set]["judge"] = summary.get("judge_description")
            rows[test_set]["judge_quality"] = summary.get("judge_quality")
    return rows


def summarize(output_dir: Path, traits: list[str]) -> dict:
    """Every trait's contrasts and functional similarity, Holm-adjusted over every contrast of the table."""
    report = {"traits": {}, "design": __doc__.split("\n\n")[1:3]}
    for trait in traits:
        report["traits"][trait] = {"contrasts": trait_contrasts(output_dir, trait),
                                   "similarity": read_json_object(output_dir / f"similarity_{trait}.json", "similarity report")}
    family = [contrast for t in report["traits"].values() for row in t["contrasts"].values()
              for key, contrast in row.items() if key.endswith(("_unsteered", "_vs_ab"))]
    for contrast, adjusted in zip(family, holm([c["p"] for c in family])):
        contrast["p_holm"] = adjusted
    report["multiplicity"] = f"Holm over the table's {len(family)} contrasts"
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
        nulls = "; ".join(f"{k}: z {v['z']:+.1f}, max {v['null_max']:+.4f}" for k, v in similarity["null_random"].items())
        others = ", ".join(f"{k} {v['cosine_with_prompt']:+.4f}/{v['cosine_with_ab']:+.4f}" for k, v in similarity["comparators"].items())
        residual = similarity["residual_stream"]["pairs"].get("prompt vs ab", {})
        print(f"data-weighted cosine {similarity['weighted_cosine']:+.4f} (weight cosine {similarity['weight_cosine']:+.4f}); "
              f"null: {nulls}; other traits (with prompt/with A/B): {others or 'none'}; "
              f"layer {similarity['residual_stream']['layer']} mean-change cosine {residual.get('mean_change_cosine', float('nan')):+.3f}, "
              f"per token {residual.get('per_token_cosine_mean', float('nan')):+.3f}")


def plot_report(report: dict, path) -> None:
    """One panel per test set: each trait's change under the prompt diff and under the A/B diff
    (+1 against unsteered), with paired standard errors."""
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
        axis.set_title(label, fontsize=8, wrap=True)
    axes[0].set_ylabel("change at +1 vs unsteered (± paired s.e.)")
    axes[0].legend(fontsize=8)
    save_figure(figure, path)
