"""Stage 4: activation steering vs persona-LoRA steering, on the same questions, seeds and judge.

    python compare_steering_methods.py --trait evil \\
        --activation_vector_path persona_vectors/SmolLM2-135M-Instruct/evil_response_avg_diff.pt \\
        --lora_diff_path persona_loras/SmolLM2-135M-Instruct/evil/evil_lora_diff.pt \\
        --coefficients 0.0 0.5 1.0 1.5 2.0 --output_dir comparison_results/ --test_latency --analyze_spaces

Writes to --output_dir:
    behavior.csv (+ .summary.json)  every answer under both methods at every coefficient
    behavior.png                    trait score and coherence vs coefficient, both methods, ± s.e.
    latency.json                    --test_latency: tokens/s unsteered, hook, merged LoRA, unmerged PEFT adapter
    spaces.json, spaces.png         --analyze_spaces: the LoRA's activation shift vs v per layer, ΔW spectra,
                                    o_proj/down_proj alignment with v, trait-by-trait similarity
    comparison.json                 the headline numbers, manifest.json
"""

import argparse
import statistics
import time
from pathlib import Path

import torch

import lora_utils as lu
from eval.activations import ActivationSteerer, decoder_layers, load_vector, response_hidden_means
from eval.analysis import effective_rank, plot_sweep, save_figure, trait_similarity
from eval.evaluate import (
    Condition,
    add_eval_args,
    file_identity,
    fill_eval_defaults,
    load_eval_model,
    prepare_judge,
    run_evaluation,
)
from eval.stats import linear_fit
from io_utils import PersonaLoRAError, run_cli, write_json, write_manifest
from model_loading import default_persona_paths, model_device


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_args(parser)
    parser.set_defaults(output_path=None)
    for action in parser._actions:
        if action.dest == "output_path":
            action.required = False
    parser.add_argument("--activation_vector_path", default=None, help="default: persona_vectors/<model>/<trait>_response_avg_diff.pt")
    parser.add_argument("--lora_diff_path", default=None, help="default: persona_loras/<model>/<trait>/<trait>_lora_diff.pt")
    parser.add_argument("--coefficients", nargs="+", type=float, default=[0.0, 0.5, 1.0, 1.5, 2.0])
    parser.add_argument("--layer", type=int, default=None, help="activation steering layer (default: two thirds of the depth)")
    parser.add_argument("--steering_type", choices=["all", "prompt", "response"], default="response")
    parser.add_argument("--output_dir", default="comparison_results")
    parser.add_argument("--test_latency", action="store_true")
    parser.add_argument("--latency_runs", type=int, default=5)
    parser.add_argument("--latency_tokens", type=int, default=64)
    parser.add_argument("--analyze_spaces", action="store_true")
    parser.add_argument("--other_traits", nargs="*", default=None,
                        help="traits whose diffs and vectors (default paths) join the trait-by-trait similarity")
    args = parser.parse_args()
    fill_eval_defaults(args)
    diff_path, vector_path = default_persona_paths(args.model, args.trait)
    args.activation_vector_path = args.activation_vector_path or str(vector_path)
    args.lora_diff_path = args.lora_diff_path or str(diff_path)
    args.output_path = str(Path(args.output_dir) / "behavior.csv")
    return args


def behaviour_conditions(args, model, vector, diff) -> list[Condition]:
    """coef 0 is the same unsteered model for both methods: generated once, as the baseline."""
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


def behaviour_results(args, summary: dict, trait: str) -> dict:
    by_method = {"lora": [], "activation": []}
    for condition in summary["conditions"]:
        for method in (["lora", "activation"] if condition["method"] == "baseline" else [condition["method"]]):
            by_method[method].append(condition)
    fits = {}
    for method, points in by_method.items():
        coefs = [p["coef"] for p in points]
        fits[method] = {"trait": linear_fit(coefs, [p[f"{trait}_mean"] for p in points]),
                        "coherence": linear_fit(coefs, [p["coherence_mean"] for p in points])}
    title = (f"{trait} on {summary['model']}: persona LoRA (α·ΔW merged) vs activation steering (c·v at layer {args.layer})\n"
             f"judge: {summary['judge'].split(':')[0]}; LoRA slope {fits['lora']['trait']['slope']:.2f} (R² {fits['lora']['trait']['r2']:.2f}), "
             f"activation slope {fits['activation']['trait']['slope']:.2f} (R² {fits['activation']['trait']['r2']:.2f})")
    plot_sweep(by_method, trait, Path(args.output_dir) / "behavior.png", title)
    return fits


def timed_generation(model, inputs, tokens: int) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    elapsed = time.perf_counter() - start
    return (output.shape[1] - inputs["input_ids"].shape[1]) * output.shape[0] / elapsed


def test_latency(args, model, tokenizer, trait, vector, diff, coefficient: float) -> dict:
    """Tokens/s for the same prompts and lengths under each method. Rounds are interleaved (every
    method once per round, the first round a discarded full-length warm-up), so drift of the
    machine's speed over time does not favour any method; medians over rounds. The merge and
    restore are one-off costs, timed apart."""
    from peft import PeftModel

    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in trait.evaluation_questions[:8]]
    inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model_device(model))
    adapter_dir = Path(args.output_dir) / "latency_adapter"
    diff.to_peft_adapter(adapter_dir, coefficient=coefficient)
    rates = {"unsteered": [], "activation_hook": [], "merged_lora": [], "unmerged_peft_adapter": []}
    merge_times, restore_times = [], []
    for round_index in range(args.latency_runs + 1):
        keep = round_index > 0
        rate = timed_generation(model, inputs, args.latency_tokens)
        if keep:
            rates["unsteered"].append(rate)
        with ActivationSteerer(model, vector, args.layer, coefficient, args.steering_type):
            rate = timed_generation(model, inputs, args.latency_tokens)
        if keep:
            rates["activation_hook"].append(rate)
        merger = lu.LoRAMerger(model)
        start = time.perf_counter()
        merger.merge_lora_diff(diff, coefficient)
        merge_times.append(time.perf_counter() - start)
        rate = timed_generation(model, inputs, args.latency_tokens)
        start = time.perf_counter()
        merger.restore_original_weights()
        restore_times.append(time.perf_counter() - start)
        if keep:
            rates["merged_lora"].append(rate)
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
        try:
            rate = timed_generation(peft_model, inputs, args.latency_tokens)
        finally:
            peft_model.unload()
        if keep:
            rates["unmerged_peft_adapter"].append(rate)
    results = {method: statistics.median(values) for method, values in rates.items()}
    return {"tokens_per_second": results, "batch": len(prompts), "new_tokens": args.latency_tokens, "rounds": args.latency_runs,
            "device": str(model_device(model)), "dtype": str(next(model.parameters()).dtype),
            "merge_seconds_median": statistics.median(merge_times[1:] or merge_times),
            "restore_seconds_median": statistics.median(restore_times[1:] or restore_times),
            "ratios_vs_unsteered": {k: v / results["unsteered"] for k, v in results.items()}}


def analyze_spaces(args, model, tokenizer, vector, diff, records, coefficient: float) -> dict:
    """Research questions 1 and 5: does ΔW act along v, and what does ΔW look like?"""
    layers = len(decoder_layers(model))
    # 1. The LoRA's own effect in activation space: δh[ℓ] = h[ℓ](W + αΔW) − h[ℓ](W) over response tokens.
    plain = response_hidden_means(model, tokenizer, records, include_system=False, desc="hidden states (unsteered)")
    with lu.LoRASteerer(model, diff, coefficient):
        steered = response_hidden_means(model, tokenizer, records, include_system=False, desc="hidden states (merged)")
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
    alignment = {}
    for kind in ("o_proj", "down_proj"):
        alignment[kind] = {}
        for name in (n for n in diff if lu.module_type(n) == kind):
            block = lu.layer_index(name)
            u, s, _ = diff.svd(name)
            direction = vector[block + 1].double()
            direction = direction / direction.norm()
            top = min(8, u.shape[1])
            alignment[kind][block] = {"top_direction_abs_cosine": float((u[:, 0] @ direction).abs()),
                                      f"energy_of_v_in_top{top}": float(((u[:, :top].T @ direction) ** 2).sum()),
                                      f"random_expectation_top{top}": top / direction.numel()}
    report = {"coefficient": coefficient, "records": len(records),
              "shift_vs_vector_cosine_by_layer": {i: round(float(c), 4) for i, c in enumerate(cosines)},
              "shift_norm_by_layer": {i: round(float(x), 4) for i, x in enumerate(shift.norm(dim=-1))},
              "effective_rank_by_module_type": effective, "normalised_spectra": spectra, "residual_write_alignment": alignment}
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
    for kind, by_block in report["residual_write_alignment"].items():
        blocks = sorted(by_block)
        key = next(k for k in by_block[blocks[0]] if k.startswith("energy"))
        axes[2].plot([b + 1 for b in blocks], [by_block[b][key] for b in blocks], marker=".", label=kind)
        random_key = key.replace("energy_of_v_in", "random_expectation")
        axes[2].axhline(by_block[blocks[0]][random_key], color="grey", linestyle=":")
    axes[2].set(xlabel="layer written (block + 1)", ylabel="‖U_topᵀ v̂‖² (grey: random)", title="Residual writes of ΔW along v")
    axes[2].legend()
    for axis in axes:
        axis.grid(alpha=0.3)
    save_figure(figure, Path(args.output_dir) / "spaces.png")


def main():
    args = parse_args()
    started = time.time()
    trait, judge = prepare_judge(args)
    vector, diff = load_vector(args.activation_vector_path), lu.load_lora_diff(args.lora_diff_path)
    model, tokenizer = load_eval_model(args)
    num_layers = len(decoder_layers(model))
    if vector.shape != (num_layers + 1, model.config.hidden_size):
        raise PersonaLoRAError(f"{args.activation_vector_path} has shape {tuple(vector.shape)}; this model needs "
                                  f"[{num_layers + 1}, {model.config.hidden_size}]")
    lu.LoRAMerger(model).check(diff)
    args.layer = args.layer or round(2 * num_layers / 3)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    _, summary = run_evaluation(args, trait, judge, behaviour_conditions(args, model, vector, diff), model, tokenizer, started)
    comparison = {"trait": trait.name, "model": summary["model"], "judge": summary["judge_description"], "layer": args.layer,
                  "coefficients": args.coefficients, "fits": behaviour_results(args, summary, trait.name)}
    strongest = max(args.coefficients, key=abs) or 1.0
    if args.test_latency:
        comparison["latency"] = test_latency(args, model, tokenizer, trait, vector, diff, strongest)
        write_json(output_dir / "latency.json", comparison["latency"])
    if args.analyze_spaces:
        from io_utils import read_jsonl

        baseline_records = read_jsonl(next((output_dir / ".behavior.work").glob("baseline-*.jsonl")))
        comparison["spaces"] = analyze_spaces(args, model, tokenizer, vector, diff, baseline_records, strongest)
        write_json(output_dir / "spaces.json", comparison["spaces"])
    write_json(output_dir / "comparison.json", comparison)
    write_manifest(output_dir, args, started)

    print("\n== fits of the trait score against the coefficient ==")
    for method, fit in comparison["fits"].items():
        print(f"  {method:10s} slope {fit['trait']['slope']:7.3f} per unit coef, R² {fit['trait']['r2']:.3f}; "
              f"coherence slope {fit['coherence']['slope']:7.3f}")
    if args.test_latency:
        ratios = comparison["latency"]["ratios_vs_unsteered"]
        print("== generation throughput vs unsteered ==  " + ", ".join(f"{k} {v:.3f}×" for k, v in ratios.items()))
        print(f"   one-off merge {comparison['latency']['merge_seconds_median'] * 1e3:.0f} ms, "
              f"restore {comparison['latency']['restore_seconds_median'] * 1e3:.0f} ms")
    if args.analyze_spaces:
        spaces = comparison["spaces"]
        cosine = spaces["shift_vs_vector_cosine_by_layer"]
        print(f"== cos(LoRA-induced shift, v): at layer {args.layer} {cosine[args.layer]:.3f}, "
              f"best {max(list(cosine.values())[1:]):.3f} at layer {spaces['best_layer']}")
        print("   effective rank of ΔW: " + ", ".join(f"{k} {v:.1f}" for k, v in spaces["effective_rank_by_module_type"].items()))
    print(f"\nwrote {output_dir}/behavior.csv, behavior.png" + (", latency.json" if args.test_latency else "")
          + (", spaces.json, spaces.png" if args.analyze_spaces else "") + ", comparison.json")


if __name__ == "__main__":
    run_cli(main)
