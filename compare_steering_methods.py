"""Stage 4: activation steering vs persona-LoRA steering, on the same questions, seeds and judge.

    python compare_steering_methods.py --trait evil \\
        --activation_vector_path persona_vectors/SmolLM2-135M-Instruct/evil_response_avg_diff.pt \\
        --lora_diff_path persona_loras/SmolLM2-135M-Instruct/evil/evil_lora_diff.pt \\
        --coefficients 0.0 0.5 1.0 1.5 2.0 --output_dir comparison_results/ --test_latency --analyze_spaces \\
        --ab_data dataset/evil/ab.jsonl

Writes to --output_dir:
    behavior.csv (+ .summary.json)  every answer under both methods at every coefficient, judged, with
                                    the judge-free margin per condition
    behavior.png                    trait score, coherence and margin vs coefficient, both methods, ± s.e.
    ab.csv (+ .summary.json), ab.png  --ab_data: forced-choice p_matching of both methods at every coefficient
    latency.json                    --test_latency: tokens/s unsteered, hook, merged LoRA, unmerged PEFT adapter
    spaces.json, spaces.png         --analyze_spaces: the LoRA's activation shift vs v per layer, ΔW spectra,
                                    o_proj/down_proj alignment with v against its matched null, trait similarity
    comparison.json                 the headline numbers, manifest.json
"""

import random
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import lora_utils as lu
from eval.activations import ActivationSteerer, check_vector_fits, decoder_layers, load_vector, response_hidden_means
from eval.analysis import effective_rank, plot_ab_sweep, plot_sweep, save_figure, trait_similarity
from eval.evaluate import Condition, add_eval_args, check_coefficients, load_eval_model, on_finetune, prepare_evaluation
from eval.evaluate import run_evaluation
from eval.stats import calibrated_contrast, cluster_slopes, holm, linear_fit, paired_difference, paired_slope
from eval.traits import load_trait
from io_utils import ArgumentParser, file_identity, finite_float, positive_int, run_cli, write_json
from io_utils import write_manifest
from model_loading import default_persona_paths, model_config, model_device

RANDOM_SUBSPACE_DRAWS = 10_000


def parse_args():
    parser = ArgumentParser(description=__doc__)
    add_eval_args(parser, output_required=False)
    parser.add_argument("--activation_vector_path", default=None, help="default: persona_vectors/<model>/<trait>_response_avg_diff.pt")
    parser.add_argument("--lora_diff_path", default=None, help="default: persona_loras/<model>/<trait>/<trait>_lora_diff.pt")
    parser.add_argument("--coefficients", nargs="+", type=finite_float, default=[0.0, 0.5, 1.0, 1.5, 2.0])
    parser.add_argument("--layer", type=int, default=None, help="activation steering layer, 1..L−1 (default: two thirds of the depth)")
    parser.add_argument("--steering_type", choices=["all", "prompt", "response"], default="response")
    parser.add_argument("--output_dir", default="comparison_results")
    parser.add_argument("--test_latency", action="store_true")
    parser.add_argument("--latency_runs", type=positive_int, default=7, help="timed rounds (after one warm-up round)")
    parser.add_argument("--latency_tokens", type=positive_int, default=64)
    parser.add_argument("--analyze_spaces", action="store_true")
    parser.add_argument("--other_traits", nargs="*", default=None,
                        help="traits whose diffs and vectors (default paths) join the trait-by-trait similarity")
    args = parser.parse_args()
    diff_path, vector_path = default_persona_paths(args.model, args.trait)
    args.activation_vector_path = args.activation_vector_path or str(vector_path)
    args.lora_diff_path = args.lora_diff_path or str(diff_path)
    return args


def check_inputs(args):
    """The trait, the vector, the diff and the layer against the model's config, before the model
    loads. The output folder is checked last, by prepare_evaluation, so a refused run leaves none."""
    load_trait(args.trait)  # an unknown trait is named as such (not as a missing vector), with the available ones
    vector, args.layer = check_vector_fits(args.activation_vector_path, model_config(args.model), args.layer,
                                           "--activation_vector_path")
    return vector, lu.load_lora_diff(args.lora_diff_path)


def behaviour_conditions(args, model, vector, diff) -> list[Condition]:
    """coef 0 is the same unsteered model for both methods: evaluated once, as the baseline."""
    conditions = [Condition("baseline", "baseline", 0.0)]
    lora_identity = {"diff": file_identity(args.lora_diff_path)}
    act_identity = {"vector": file_identity(args.activation_vector_path), "layer": args.layer, "steering_type": args.steering_type}
    for coef in (c for c in args.coefficients if c != 0):
        conditions.append(Condition(f"lora_coef{coef:g}", "lora", coef, (lambda c: lambda: lu.LoRASteerer(model, diff, c))(coef),
                                    identity=lora_identity))
        conditions.append(Condition(f"act_L{args.layer}_coef{coef:g}", "activation", coef,
                                    (lambda c: lambda: ActivationSteerer(model, vector, args.layer, c, args.steering_type))(coef),
                                    identity=act_identity))
    return conditions


def by_method(conditions: list[dict]) -> dict[str, list[dict]]:
    """Each method's conditions, the shared baseline counted as coefficient 0 of both."""
    series = {"lora": [], "activation": []}
    for condition in conditions:
        for method in (list(series) if condition["method"] in ("baseline", "finetune") else [condition["method"]]):
            series[method].append(condition)
    return series


def method_fits(summary: dict, metric: str) -> dict:
    """Slope of `metric` per unit coefficient for each method: fit per question over the
    coefficients and averaged (its error paired by question), with R² of the condition means."""
    fits = {}
    for method, points in by_method(summary["conditions"]).items():
        if f"{metric}_by_question" not in points[0]:
            continue
        coefs = [p["coef"] for p in points]
        fit = linear_fit(coefs, [p[f"{metric}_mean"] for p in points])
        fits[method] = {**paired_slope(coefs, [p[f"{metric}_by_question"] for p in points]), "r2": fit["r2"],
                        "points": fit["points"]}
    return fits


def method_contrasts(summary: dict, trait: str) -> dict:
    """LoRA minus activation at each coefficient both evaluated, paired by question (same questions,
    same sampling seeds). The coefficients are in different units (α scales ΔW, c scales v): read
    a contrast together with the coherence it costs."""
    series = by_method(summary["conditions"])
    contrasts = {}
    for lora in series["lora"]:
        activation = next((a for a in series["activation"] if a["coef"] == lora["coef"] and a is not lora), None)
        if activation is None or lora["method"] != "lora":
            continue
        entry = {}
        for metric in (trait, "coherence", "margin"):
            if f"{metric}_by_question" in lora and f"{metric}_by_question" in activation:
                mean, sem, n = paired_difference(lora[f"{metric}_by_question"], activation[f"{metric}_by_question"])
                entry.update({metric: mean, f"{metric}_sem": sem, "questions": n})
        contrasts[f"{lora['coef']:g}"] = entry
    return contrasts


def calibrated_methods(summary: dict, trait: str, ab: dict | None) -> dict | None:
    """The two methods in calibrated units. Their coefficients are not (α scales ΔW, c scales v), so
    each method's judged trait slope, and its A/B slope, is read per nat of its own margin slope, the
    judge-free measure both move: what a method buys at an equal change of the margin. LoRA minus
    activation with its error paired by question and item (calibrated_contrast). None without a
    margin in every condition."""
    def per_unit_slopes(conditions: list[dict], key: str) -> dict[str, dict]:
        series = by_method(conditions)
        return {m: cluster_slopes([p["coef"] for p in series[m]], [p[key] for p in series[m]]) for m in ("lora", "activation")}

    if not all(c.get("margin_by_question") for c in summary["conditions"]):
        return None
    margins = per_unit_slopes(summary["conditions"], "margin_by_question")
    result = {"per": "nat of margin slope (the margin's change per unit coefficient)",
              "trait": calibrated_contrast(per_unit_slopes(summary["conditions"], f"{trait}_by_question"), margins, same_units=True)}
    if ab is not None:
        result["ab"] = calibrated_contrast(per_unit_slopes(ab["conditions"], "both_orders_by_item"), margins, same_units=False)
    differences = [result[m]["difference"] for m in ("trait", "ab") if m in result]
    for difference, adjusted in zip(differences, holm([d["p"] for d in differences])):
        difference["p_holm"] = adjusted  # over this comparison's calibrated differences
    result["holm_tests"] = sum(d["p"] == d["p"] for d in differences)  # Holm counts the defined ones
    return result


def behaviour_results(args, summary: dict, trait: str) -> dict:
    fits = {metric_name: method_fits(summary, metric) for metric_name, metric in
            (("trait", trait), ("coherence", "coherence"), ("margin", "margin"))}
    fits = {method: {metric: fits[metric][method] for metric in fits if method in fits[metric]} for method in ("lora", "activation")}
    title = (f"{trait} on {summary['model']}: persona LoRA (α·ΔW merged) vs activation steering (c·v at layer {args.layer})\n"
             f"judge: {summary['judge'].split(':')[0]}; slopes per unit coefficient ± s.e. (paired by question): "
             + "; ".join(f"{m} {fits[m]['trait']['slope']:.2f} ± {fits[m]['trait']['slope_sem']:.2f}" for m in fits))
    plot_sweep(by_method(summary["conditions"]), trait, Path(args.output_dir) / "behavior.png", title)
    return fits


def timed_generation(model, inputs, tokens: int) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    elapsed = time.perf_counter() - start
    return (output.shape[1] - inputs["input_ids"].shape[1]) * output.shape[0] / elapsed


def test_latency(args, model, tokenizer, trait, vector, diff, coefficient: float) -> dict:
    """Tokens/s for the same prompts and lengths under each method. Every round times every method
    once, in an order drawn anew each round (seeded), after one full warm-up round that is thrown
    away: neither the machine's drift nor a method's place in the round favours any method. Each
    method's speed is compared with the unsteered model's in the same round; the report gives the
    median ratio and its spread over rounds. The merge and restore are one-off costs, timed apart."""
    from peft import PeftModel

    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in trait.evaluation_questions[:8]]
    inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model_device(model))
    adapter_dir = Path(args.output_dir) / "latency_adapter"
    diff.to_peft_adapter(adapter_dir, coefficient=coefficient)
    merge_times, restore_times = [], []

    def unsteered():
        return timed_generation(model, inputs, args.latency_tokens)

    def activation_hook():
        with ActivationSteerer(model, vector, args.layer, coefficient, args.steering_type):
            return timed_generation(model, inputs, args.latency_tokens)

    def merged_lora():
        merger = lu.LoRAMerger(model)
        start = time.perf_counter()
        merger.merge_lora_diff(diff, coefficient)
        merge_times.append(time.perf_counter() - start)
        try:
            return timed_generation(model, inputs, args.latency_tokens)
        finally:
            start = time.perf_counter()
            merger.restore_original_weights()
            restore_times.append(time.perf_counter() - start)

    def unmerged_peft_adapter():
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
        try:
            return timed_generation(peft_model, inputs, args.latency_tokens)
        finally:
            peft_model.unload()

    methods = {f.__name__: f for f in (unsteered, activation_hook, merged_lora, unmerged_peft_adapter)}
    rng = random.Random(0)
    rounds = []
    for round_index in range(args.latency_runs + 1):
        order = list(methods)
        rng.shuffle(order)
        rates = {name: methods[name]() for name in order}
        if round_index > 0:  # the first round warms every code path up and is discarded
            rounds.append({"order": order, "tokens_per_second": rates})
    medians = {name: statistics.median(r["tokens_per_second"][name] for r in rounds) for name in methods}
    ratios = {name: [r["tokens_per_second"][name] / r["tokens_per_second"]["unsteered"] for r in rounds] for name in methods}
    return {"tokens_per_second": medians, "batch": len(prompts), "new_tokens": args.latency_tokens, "rounds": rounds,
            "device": str(model_device(model)), "dtype": str(next(model.parameters()).dtype),
            "merge_seconds_median": statistics.median(merge_times[1:] or merge_times),
            "restore_seconds_median": statistics.median(restore_times[1:] or restore_times),
            "ratios_vs_unsteered": {name: statistics.median(values) for name, values in ratios.items()},
            "ratio_spread_vs_unsteered": {name: {"min": min(values), "max": max(values)} for name, values in ratios.items()},
            "method": "per round: every method once in a seeded random order; ratios to the unsteered model of the same round; "
                      "medians over rounds after one discarded warm-up round"}


def residual_write_alignment(diff, vector, top: int) -> tuple[dict, list[float]]:
    """Per o_proj/down_proj module of `diff` (block b writes hidden_states[b+1]): how much of
    v[b+1]'s direction lies in the module's top-`top` output directions. Returns the per-module
    report and the energies."""
    alignment, energies = {}, []
    for kind in ("o_proj", "down_proj"):
        alignment[kind] = {}
        for name in (n for n in diff if lu.module_type(n) == kind):
            block = lu.layer_index(name)
            u, _, _ = diff.svd(name)
            direction = vector[block + 1].double()
            direction = direction / direction.norm()
            k = min(top, u.shape[1])
            energy = float(((u[:, :k].T @ direction) ** 2).sum())
            energies.append(energy)
            alignment[kind][block] = {"top_direction_abs_cosine": float((u[:, 0] @ direction).abs()),
                                      f"energy_of_v_in_top{top}": energy}
    return alignment, energies


def random_subspace_null(dimension: int, top: int, modules: int, draws: int = RANDOM_SUBSPACE_DRAWS, seed: int = 0) -> dict:
    """The matched null for "the best module's top-k output directions hold x of v's energy": the
    energy of a unit vector in a random k-dimensional subspace of d dimensions is Beta(k/2, (d−k)/2);
    the statistic is a maximum over `modules` modules, so its null is the maximum of that many draws."""
    rng = np.random.default_rng(seed)
    maxima = rng.beta(top / 2, (dimension - top) / 2, size=(draws, modules)).max(axis=1)
    return {"mean_single": top / dimension, "mean_of_max": float(maxima.mean()), "p95_of_max": float(np.quantile(maxima, 0.95)),
            "maxima": maxima, "modules": modules, "draws": draws}


def analyze_spaces(args, model, tokenizer, vector, diff, records, coefficient: float) -> dict:
    """Research questions 1 and 5: does ΔW act along v, and what does ΔW look like?"""
    layers = len(decoder_layers(model))
    # 1. The LoRA's own effect in activation space: δh[ℓ] = h[ℓ](W + αΔW) − h[ℓ](W) over answer tokens.
    plain = response_hidden_means(model, tokenizer, records, with_context=False, desc="hidden states (unsteered)")
    with lu.LoRASteerer(model, diff, coefficient):
        steered = response_hidden_means(model, tokenizer, records, with_context=False, desc="hidden states (merged)")
    shift = (steered - plain).mean(0)
    cosines = torch.nn.functional.cosine_similarity(shift, vector, dim=-1)
    # 2. Spectra and effective rank of ΔW per module type.
    spectra, effective = {}, {}
    for kind in sorted({lu.module_type(n) for n in diff}):
        values = [diff.singular_values(n) for n in diff if lu.module_type(n) == kind]
        width = min(len(v) for v in values)
        normalised = torch.stack([v[:width] / v[0] for v in values]).mean(0)
        spectra[kind] = [round(float(x), 5) for x in normalised]
        effective[kind] = statistics.mean(effective_rank(v) for v in values)
    # 3. Do the residual-writing modules (o_proj, down_proj of block b → hidden_states[b+1]) write along v?
    top = 8
    alignment, energies = residual_write_alignment(diff, vector, top)
    null = random_subspace_null(vector.shape[1], top, len(energies))
    best = max(energies)
    # A control with the same anisotropy as real updates: other traits' diffs (independently
    # initialised), read against this trait's v. A random subspace ignores that residual-stream
    # directions share outlier dimensions, so its p-value alone is too kind.
    controls = {}
    for other in args.other_traits or []:
        other_path = default_persona_paths(args.model, other)[0]
        if other_path.is_file():
            controls[other] = max(residual_write_alignment(lu.load_lora_diff(other_path), vector, top)[1])
    report = {"coefficient": coefficient, "records": len(records),
              "shift_vs_vector_cosine_by_layer": {i: round(float(c), 4) for i, c in enumerate(cosines)},
              "shift_norm_by_layer": {i: round(float(x), 4) for i, x in enumerate(shift.norm(dim=-1))},
              "effective_rank_by_module_type": effective, "normalised_spectra": spectra, "residual_write_alignment": alignment,
              "residual_write_best": {"energy": best, "modules": len(energies), "top": top,
                                      "null_single_subspace_mean": null["mean_single"],
                                      "null_max_over_modules_mean": null["mean_of_max"],
                                      "null_max_over_modules_p95": null["p95_of_max"],
                                      "p_value": float((1 + (null["maxima"] >= best).sum()) / (1 + null["draws"])),
                                      "null": f"the maximum over {len(energies)} random {top}-dimensional subspaces "
                                              f"({null['draws']} draws): the statistic is a maximum over modules",
                                      "other_traits_diffs_best_energy": controls}}
    report["best_layer"] = int(cosines[1:].argmax()) + 1
    report["trait_similarity"] = other_traits_similarity(args, diff, vector)
    plot_spaces(args, report, layers)
    return report


def other_traits_similarity(args, diff, vector) -> dict | None:
    """The trait-by-trait similarity of --trait and the --other_traits whose outputs exist."""
    traits = {args.trait: (diff, vector)}
    for other in args.other_traits or []:
        diff_path, vector_path = default_persona_paths(args.model, other)
        if diff_path.is_file() and vector_path.is_file():
            traits[other] = (lu.load_lora_diff(diff_path), load_vector(vector_path))
        else:
            print(f"skipping {other}: extract it first ({diff_path} / {vector_path} missing)")
    return trait_similarity(traits, args.layer) if len(traits) > 1 else None


def plot_spaces(args, report: dict, layers: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    cosines = report["shift_vs_vector_cosine_by_layer"]
    axes[0].plot(list(cosines), list(cosines.values()), marker=".")
    axes[0].axvline(args.layer, color="grey", linestyle=":", label=f"steering layer {args.layer}")
    axes[0].set(xlabel="layer ℓ (hidden_states index)", ylabel="cos(δh_LoRA[ℓ], v[ℓ])",
                title="LoRA-induced activation shift vs persona vector")
    axes[0].legend()
    for kind, spectrum in report["normalised_spectra"].items():
        axes[1].semilogy(range(1, len(spectrum) + 1), spectrum, label=f"{kind} (eff. rank {report['effective_rank_by_module_type'][kind]:.1f})")
    axes[1].set(xlabel="singular value index", ylabel="σᵢ / σ₁ (mean over layers)", title="ΔW spectra by module type")
    axes[1].legend(fontsize=7)
    best = report["residual_write_best"]
    for kind, by_block in report["residual_write_alignment"].items():
        blocks = sorted(by_block)
        axes[2].plot([b + 1 for b in blocks], [by_block[b][f"energy_of_v_in_top{best['top']}"] for b in blocks], marker=".", label=kind)
    axes[2].axhline(best["null_single_subspace_mean"], color="grey", linestyle=":", label="random subspace (mean)")
    axes[2].axhline(best["null_max_over_modules_p95"], color="grey", linestyle="--",
                    label=f"max of {best['modules']} random (95th pct.)")
    axes[2].set(xlabel="layer written (block + 1)", ylabel=f"‖U_top{best['top']}ᵀ v̂‖²", title="Residual writes of ΔW along v")
    axes[2].legend(fontsize=7)
    for axis in axes:
        axis.grid(alpha=0.3)
    save_figure(figure, Path(args.output_dir) / "spaces.png")


def main():
    args = parse_args()
    started = time.time()
    output_dir = Path(args.output_dir)
    vector, diff = check_inputs(args)
    check_coefficients(args.model, args.dtype, [diff], [args.coefficients], "--coefficients")
    ab_run = prepare_evaluation(args, output_dir / "ab.csv", "--output_dir", mode="ab") if args.ab_data else None
    judged_run = prepare_evaluation(args, output_dir / "behavior.csv", "--output_dir", mode="judged")
    model, tokenizer = load_eval_model(judged_run)

    conditions = on_finetune(judged_run, model, behaviour_conditions(args, model, vector, diff))
    judged = run_evaluation(judged_run, conditions, model, tokenizer)
    summary = judged.summary
    comparison = {"trait": args.trait, "model": summary["model"], "judge": summary["judge_description"],
                  "judge_quality": summary["judge_quality"], "layer": args.layer, "coefficients": args.coefficients,
                  "fits": behaviour_results(args, summary, args.trait),
                  "fits_note": "slope per unit coefficient, fit per question and averaged (s.e. paired by question); r2 of the "
                               "condition means; the two coefficients are in different units (α scales ΔW, c scales v)",
                  "lora_minus_activation": method_contrasts(summary, args.trait)}
    ab = None
    if ab_run is not None:
        ab = run_evaluation(ab_run, conditions, model, tokenizer).summary
        comparison["ab"] = {"slopes": ab["slopes"], "ab_data": args.ab_data,
                            "balanced_p_matching": {c["condition"]: c["balanced_p_matching_both_orders"] for c in ab["conditions"]}}
        plot_ab_sweep(by_method(ab["conditions"]), output_dir / "ab.png",
                      f"{args.trait} A/B on {summary['model']} ({ab['items']} items, no judge): balanced p_matching")
    comparison["calibrated"] = calibrated_methods(summary, args.trait, ab)
    strongest = max(args.coefficients, key=abs) or 1.0
    if args.test_latency:
        comparison["latency"] = test_latency(args, model, tokenizer, judged_run.trait, vector, diff, strongest)
        write_json(output_dir / "latency.json", comparison["latency"])
    if args.analyze_spaces:
        baseline_records = judged.answers[conditions[0].name]
        comparison["spaces"] = analyze_spaces(args, model, tokenizer, vector, diff, baseline_records, strongest)
        write_json(output_dir / "spaces.json", comparison["spaces"])
    write_json(output_dir / "comparison.json", comparison)
    write_manifest(output_dir, args, started)

    print("\n== slopes per unit coefficient (± s.e. paired by question) ==")
    for method, fit in comparison["fits"].items():
        print(f"  {method:10s} " + ", ".join(f"{metric} {f['slope']:+.4f} ± {f['slope_sem']:.4f} (R² {f['r2']:.2f})"
                                             for metric, f in fit.items()))
    if ab_run is not None:
        for method, slope in comparison["ab"]["slopes"].items():
            print(f"  A/B {method:6s} balanced p_matching {slope['slope']:+.4f} ± {slope['slope_sem']:.4f} per unit (paired by item)")
    if comparison["calibrated"]:
        print(f"== in calibrated units: per {comparison['calibrated']['per']} ==")
        for measure in ("trait", "ab"):
            if measure in comparison["calibrated"]:
                c = comparison["calibrated"][measure]
                d = c["difference"]
                tested = (f"p {d['p']:.2g}, Holm over {comparison['calibrated']['holm_tests']} {d['p_holm']:.2g}, {d['p_method']}"
                          if d["p"] == d["p"] else d["p_method"])
                print(f"  {args.trait if measure == 'trait' else 'A/B p_matching':14s} " + ", ".join(
                    f"{m} {c[m]['ratio']:+.4f} ± {c[m]['sem']:.4f} [{c[m]['ci'][0]:+.3g}, {c[m]['ci'][1]:+.3g}]"
                    for m in ("lora", "activation")) + f"; LoRA − activation {d['mean']:+.4f} ± {d['sem']:.4f} ({tested})")
    if args.test_latency:
        latency = comparison["latency"]
        print("== generation throughput vs unsteered (median ratio over rounds, [min, max]) ==  " + ", ".join(
            f"{k} {v:.3f}× [{latency['ratio_spread_vs_unsteered'][k]['min']:.3f}, {latency['ratio_spread_vs_unsteered'][k]['max']:.3f}]"
            for k, v in latency["ratios_vs_unsteered"].items()))
        print(f"   one-off merge {latency['merge_seconds_median'] * 1e3:.0f} ms, restore {latency['restore_seconds_median'] * 1e3:.0f} ms")
    if args.analyze_spaces:
        spaces = comparison["spaces"]
        cosine = spaces["shift_vs_vector_cosine_by_layer"]
        best = spaces["residual_write_best"]
        print(f"== cos(LoRA-induced shift, v): at layer {args.layer} {cosine[args.layer]:.3f}, "
              f"best {max(list(cosine.values())[1:]):.3f} at layer {spaces['best_layer']}")
        print(f"   best residual write holds {best['energy']:.3f} of v's energy in its top {best['top']} directions; null "
              f"(max over {best['modules']} random subspaces) mean {best['null_max_over_modules_mean']:.3f}, p = {best['p_value']:.3g}"
              + "".join(f"; {t}'s diff: {e:.3f}" for t, e in best["other_traits_diffs_best_energy"].items()))
        print("   effective rank of ΔW: " + ", ".join(f"{k} {v:.1f}" for k, v in spaces["effective_rank_by_module_type"].items()))
    print(f"\nwrote {output_dir}/behavior.csv, behavior.png" + (", ab.csv, ab.png" if ab_run else "")
          + (", latency.json" if args.test_latency else "") + (", spaces.json, spaces.png" if args.analyze_spaces else "")
          + ", comparison.json")


if __name__ == "__main__":
    run_cli(main)
