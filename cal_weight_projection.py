"""Stage 3: project finetunes' weight changes onto a persona direction, to predict trait drift.

    python cal_weight_projection.py \\
        --original_model meta-llama/Llama-3.1-8B-Instruct \\
        --finetuned_model ./ckpt/Llama-3.1-8B-Instruct/evil_misaligned \\
        --lora_diff_path persona_loras/Llama-3.1-8B-Instruct/evil/evil_lora_diff.pt \\
        --output_path results/weight_projection.json
    # every model or adapter folder below a directory, correlated with per-model trait scores
    python cal_weight_projection.py --original_model M --finetuned_models_dir ckpt/M --lora_diff_path P \\
        --behavior_scores scores.csv --output_path results/weight_projection.json

projection = ⟨W_ft − W_orig, ΔW⟩_F / ‖ΔW‖_F over the modules of the diff (the length of the weight
change along the unit persona direction); positive means the finetune moved toward the trait.
cosine = ⟨W_ft − W_orig, ΔW⟩_F / (‖W_ft − W_orig‖_F·‖ΔW‖_F) over the same modules; the change in
every module outside the diff is reported apart ("outside_diff_change_norm"), the same way for
adapters and checkpoints.

A finetuned model is either a PEFT adapter folder, whose change is its own exact low-rank update
(the base weights are not read at all), or a full checkpoint (safetensors, sharded or not), which
is streamed one tensor at a time from memory-mapped files: two 70B models never sit in memory.
An adapter that starts from the persona adapters' initialisation shares their row space, and its
projection is then large whatever it learned: "shared_row_space" measures how much of the adapter's
lora_A lies in the diff's (about k/in for independent starts) and a high value is warned about.

Output JSON, per model: "projection", "cosine", "layers" ({layer: {projection, cosine, inner,
delta_norm, diff_norm}}), "modules" (the same per module), "kind" (adapter | checkpoint), "path",
"modules_projected", "change_norm", "outside_diff_change_norm" (+ "shared_row_space" for adapters).
With --behavior_scores, "correlation_<measure>" for each measure given (behavior_score: the judged
score; margin: the judge-free margin; ab: the A/B p_matching), each over all finetunes, over the
LoRA finetunes with replicates of one dataset averaged, and over the dense ones apart, with
permutation p-values (exact for n ≤ 8); "measured_by" names the judge, settings and reference
answers every summary shared (summaries measured differently are refused).

Several --lora_diff_path (e.g. a trait's prompt-derived and A/B-derived diffs) are reported side
by side: the first keeps every field above, and each model gets "by_diff" {label: its projection
and cosine on every diff}, with "correlations_by_diff" beside (the same groups per diff). The
mixture series (finetunes named mix_<r>, mix_<r>_replicate by scripts/make_mixtures.py) also gets,
per diff and measure, the partial correlation of behaviour with projection given the mixing
fraction r/100 over its LoRA finetunes, one point per dataset ("partial_correlation_given_fraction",
eval.stats.partial_correlation: does the projection predict behaviour beyond what the data's
mixture already says?). "multiplicity": Holm over every test of the run (each correlation's two
p-values, each partial correlation, each null test), the adjusted p beside each raw one.

--null_draws N (100 when given bare) and --null_diffs P...: each finetune is also projected onto N
random low-rank directions with each persona diff's per-module ranks and Frobenius norms (the same
draws for every finetune, seeded by --null_seed and the diff's label) and onto other traits' diffs
(lora_utils.project_finetunes_null: each module's draws are generated once for all finetunes, and
each finetune is read once more): per model and diff, "null" holds its z-score against the random draws, the share of draws reaching it, and
the projection onto each null diff with how many of them reach it in absolute value.
"""

import json
import re
import time
from pathlib import Path

from tqdm.auto import tqdm

import lora_utils as lu
from eval.analysis import save_figure
from eval.evaluate import measurement_identity, require_same_measurement
from eval.generation import read_chat_jsonl
from eval.stats import correlations, holm, partial_correlation
from io_utils import (
    ArgumentParser,
    non_negative_int,
    positive_int,
    OutputLock,
    PersonaLoRAError,
    check_writable,
    is_temporary,
    read_json_object,
    run_cli,
    write_json,
    write_manifest,
)
from model_loading import model_label, resolve_model_folder
from trainer import records_digest



def parse_args():
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--original_model", default=None, help="hub id or folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--finetuned_model", nargs="*", default=[], help="checkpoint or PEFT adapter folder(s)")
    parser.add_argument("--finetuned_models_dir", default=None, help="project every model or adapter folder below this one")
    parser.add_argument("--lora_diff_path", nargs="+", required=True,
                        help="the persona diff; several (e.g. prompt-derived and A/B-derived) are reported side by side, the first as before")
    parser.add_argument("--output_path", required=True)
    parser.add_argument("--behavior_scores", nargs="+", default=None,
                        help="CSV with columns model (folder path or name), score and optionally sem, or eval_lora_persona.py "
                             ".summary.json files of runs with --adapter (the finetune, its trait mean and its margin)")
    parser.add_argument("--null_draws", type=positive_int, nargs="?", const=100, default=None,
                        help="project every finetune onto N random low-rank directions matched to each diff (100 when given bare)")
    parser.add_argument("--null_diffs", nargs="*", default=[], help="other traits' persona diffs, as a second null")
    parser.add_argument("--null_seed", type=non_negative_int, default=0)
    args = parser.parse_args()
    if args.null_diffs and args.null_draws is None:
        args.null_draws = 100  # the other traits' diffs come with the random null: one report, both nulls
    if not args.finetuned_model and not args.finetuned_models_dir:
        parser.error("give --finetuned_model or --finetuned_models_dir")
    return args


def model_folders(args) -> list[Path]:
    """The finetunes to project; below --finetuned_models_dir, every folder holding a model or an
    adapter, except hidden and temporary folders (a save that a kill interrupted is not a model)."""
    folders = [Path(p) for p in args.finetuned_model]
    if args.finetuned_models_dir:
        root = Path(args.finetuned_models_dir)
        if not root.is_dir():
            raise PersonaLoRAError(f"--finetuned_models_dir {root} is not a folder")
        found = sorted({p.parent for pattern in ("adapter_config.json", "model.safetensors", "model.safetensors.index.json")
                        for p in root.rglob(pattern)
                        if not is_temporary(p.relative_to(root)) and not any(part.startswith(".") for part in p.relative_to(root).parts)})
        if not found:
            raise PersonaLoRAError(f"no model or adapter folder below {root}")
        folders += found
    return folders


MEASURES = {"behavior_score": "judged score", "margin": "judge-free margin", "ab": "A/B p_matching (both orders)"}


def read_summary_measures(path: str) -> tuple[str, dict, dict]:
    """(finetune, its measures, what made them) from an eval_lora_persona.py summary of a run with
    --adapter: the judged score and the margin (judged mode) or the A/B p_matching (A/B mode)."""
    summary = read_json_object(path, "summary")
    if not summary.get("adapter") or len(summary.get("conditions", [])) != 1:
        raise PersonaLoRAError(f"{path} is not the summary of an eval_lora_persona.py run with --adapter and one condition")
    condition = summary["conditions"][0]
    if summary.get("mode") == "ab":
        measures = {"ab": condition["balanced_p_matching_both_orders"], "ab_sem": condition.get("balanced_p_matching_both_orders_sem")}
    else:
        trait = summary["trait"]
        measures = {"behavior_score": condition[f"{trait}_mean"], "behavior_score_sem": condition.get(f"{trait}_sem"),
                    "margin": condition.get("margin_mean"), "margin_sem": condition.get("margin_sem")}
    return summary["adapter"], measures, measurement_identity(summary)


def read_behavior_scores(paths: list[str]) -> tuple[dict[str, dict], dict]:
    """{model path or folder name: its measures} from CSVs (model, score, optionally sem) or
    evaluation summaries, and what made them. Summaries of one kind must come from one judge, one
    set of generation settings and one set of reference answers (or one A/B file): measures made
    differently are not comparable, and are refused."""
    import pandas as pd

    entries, identities = [], {}
    for path in paths:
        if not Path(path).is_file():
            raise PersonaLoRAError(f"--behavior_scores file not found: {path}")
        if path.endswith(".json"):
            model, measures, identity = read_summary_measures(path)
            identities.setdefault(identity["kind"], {})[path] = identity
            entries.append((model, measures))
        else:
            table = pd.read_csv(path)
            if not {"model", "score"} <= set(table.columns):
                raise PersonaLoRAError(f"{path} needs the columns model and score (has {', '.join(table.columns)})")
            sems = table["sem"] if "sem" in table.columns else [None] * len(table)
            entries += [(str(m), {"behavior_score": float(v), "behavior_score_sem": None if e is None else float(e)})
                        for m, v, e in zip(table["model"], table["score"], sems)]
    made_by = {}
    for kind, by_path in identities.items():
        require_same_measurement(by_path, "--behavior_scores")
        first_path, identity = next(iter(by_path.items()))
        made_by[kind] = {**identity, "example_summary": first_path}
    scores: dict[str, dict] = {}
    for model, measures in entries:
        for key in (str(Path(model)), Path(model).name):
            scores.setdefault(key, {}).update(measures)
    return scores, made_by


def dataset_of(model: dict) -> str:
    """The training data a finetune was made from, by content (its training.json), to pool
    replicates: two finetunes of one dataset with other seeds are not independent points of a
    correlation, even when each was given its own copy of the file."""
    record = Path(model["path"]) / "training.json"
    if not record.is_file():
        return model["name"]
    training = json.loads(record.read_text())
    if training.get("training_data_sha256"):
        return training["training_data_sha256"]
    data = Path(training.get("training_file") or "")
    if data.is_file():  # finetunes saved before the digest was recorded
        records = read_chat_jsonl(data)
        return records_digest(records[: training.get("examples") or len(records)])
    return training.get("training_file") or model["name"]


def correlation_groups(scored: list[dict], datasets: dict[str, str]) -> dict[str, list[list[dict]]]:
    """The finetunes a correlation runs over, each point a list of finetunes averaged into one:
    every finetune alone ("all_finetunes": LoRA and dense on one axis, and a dense finetune of the
    same data as a LoRA one counted again, so read it with care); the LoRA finetunes with
    replicates of one dataset averaged ("lora_by_dataset": one point per dataset); the dense ones
    apart ("dense": full-rank updates, another kind of finetune on another scale)."""
    by_dataset: dict[str, list[dict]] = {}
    for m in (m for m in scored if m["kind"] == "adapter"):
        by_dataset.setdefault(datasets[m["path"]], []).append(m)
    return {"all_finetunes": [[m] for m in scored], "lora_by_dataset": list(by_dataset.values()),
            "dense": [[m] for m in scored if m["kind"] == "checkpoint"]}


def group_correlations(groups: dict[str, list[list[dict]]], projection_of, measure: str) -> dict:
    """Pearson and Spearman of projection against `measure` over each group of at least 3 points."""
    stats = {}
    for name, points in groups.items():
        if len(points) >= 3:
            xs = [sum(projection_of(m) for m in point) / len(point) for point in points]
            ys = [sum(m[measure] for m in point) / len(point) for point in points]
            stats[name] = correlations(xs, ys)
    return stats


def correlate(models: list[dict], scores_paths: list[str]) -> dict:
    """Projection against each behaviour measure, with permutation p-values, over each group of
    correlation_groups; the finetunes' datasets are kept in "datasets" for correlate_by_diff."""
    scores, made_by = read_behavior_scores(scores_paths)
    for model in models:
        entry = scores.get(str(Path(model["path"])), scores.get(model["name"], {}))
        for measure in MEASURES:
            model[measure], model[f"{measure}_sem"] = entry.get(measure), entry.get(f"{measure}_sem")
    result = {"measured_by": made_by}
    datasets = {m["path"]: dataset_of(m) for m in models if m["kind"] == "adapter"}  # reads training.json once per model
    for model in models:
        if model["kind"] == "adapter":
            model["dataset"] = datasets[model["path"]]
    for measure, label in MEASURES.items():
        scored = [m for m in models if m[measure] is not None]
        if measure == "behavior_score" and len(scored) < 3:
            raise PersonaLoRAError(f"--behavior_scores score only {len(scored)} of the projected models; need at least 3 to correlate")
        if len(scored) < 3:
            continue
        stats = group_correlations(correlation_groups(scored, datasets), lambda m: m["projection"], measure)
        result[f"correlation_{measure}"] = {**stats, "measure": label}
    # The judged score's pooled correlation keeps its old place, for readers of earlier outputs.
    result["correlation"] = result["correlation_behavior_score"]["all_finetunes"]
    return result


MIXTURE_NAME = re.compile(r"^(?:dense_)?mix_(?P<ratio>\d+)(?:_replicate)?$")


def mixing_fraction(model: dict) -> float | None:
    """A finetune's share of trait data, from the name scripts/make_mixtures.py gives it."""
    match = MIXTURE_NAME.match(model["name"])
    return int(match["ratio"]) / 100 if match else None


def correlate_by_diff(models: list[dict], labels: list[str]) -> dict:
    """Per diff and behaviour measure: Pearson and Spearman over each group of correlation_groups,
    and the partial correlation of behaviour with projection given the mixing fraction over the
    LoRA mixture series, one point per dataset. The dense finetunes stay out of it: on their own
    scale, beside a fraction they share with LoRA points of the same data, they would make the
    residuals tell dense from LoRA instead of projection from behaviour."""
    datasets = {m["path"]: m.get("dataset", m["name"]) for m in models if m["kind"] == "adapter"}
    result = {}
    for label in labels:
        entry = {}
        for measure in MEASURES:
            scored = [m for m in models if m.get(measure) is not None]
            if len(scored) < 3:
                continue
            groups = correlation_groups(scored, datasets)
            stats = group_correlations(groups, lambda m: m["by_diff"][label]["projection"], measure)
            series = [point for point in groups["lora_by_dataset"] if mixing_fraction(point[0]) is not None]
            if len(series) >= 4:
                partial = partial_correlation([sum(m["by_diff"][label]["projection"] for m in p) / len(p) for p in series],
                                              [sum(m[measure] for m in p) / len(p) for p in series],
                                              [mixing_fraction(p[0]) for p in series])
                stats["partial_correlation_given_fraction"] = {**partial, "series": [p[0]["name"] for p in series],
                                                               "series_is": "the LoRA mixture finetunes, one point per dataset"}
            entry[measure] = stats
        result[label] = entry
    return result


def adjust_for_multiplicity(output: dict) -> None:
    """Holm over every test the run reports, in place: each correlation's Pearson and Spearman p of
    every diff, measure and group, each partial correlation, and each finetune's random-null test
    of every diff (two-sided). The adjusted p sits beside its raw one (…_holm)."""
    correlation_tests, partial_tests, null_tests = [], [], []  # (dict, key of its p)
    for by_measure in output.get("correlations_by_diff", {}).values():
        for stats in by_measure.values():
            for group, test in stats.items():
                if group == "partial_correlation_given_fraction":
                    partial_tests.append((test, "p"))
                else:
                    correlation_tests += [(test, "pearson_p"), (test, "spearman_p")]
    for model in output.get("models", [output]):
        null_tests += [(null["null"], "p_two_sided") for null in model.get("null", {}).values()]
    tests = correlation_tests + partial_tests + null_tests
    for (test, key), adjusted in zip(tests, holm([test[key] for test, key in tests])):
        test[f"{key}_holm"] = adjusted
    # Name only what the family holds, with its counts: a reader checks the size against the parts.
    parts = [(len(correlation_tests), "correlation p-value", " (Pearson and Spearman, each diff, measure and group)"),
             (len(partial_tests), "partial correlation", ""), (len(null_tests), "random-null test", " (each finetune and diff)")]
    output["multiplicity"] = (f"Holm over the run's {len(tests)} tests: "
                              + ", ".join(f"{count} {what}{'s' * (count > 1)}{detail}" for count, what, detail in parts if count))


def diff_labels(paths: list[str]) -> list[str]:
    """A name per diff that tells two diffs of one trait apart (their files share a name):
    '<folder>/<file stem>', numbered if still equal."""
    labels = []
    for path in paths:
        label = f"{Path(path).parent.name}/{Path(path).stem}"
        labels.append(label if label not in labels else f"{label}#{len(labels)}")
    return labels


def plot_scatter(models: list[dict], correlation: dict, diff: lu.PersonaLoRADiff, path: Path) -> Path:
    """Each behaviour measure against the projection, one panel each (LoRA and dense finetunes
    marked apart), titled with the correlation over every finetune."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    labels = {"behavior_score": "trait score of the finetune (judged, ± s.e.)", "margin": "log-likelihood margin (no judge, ± s.e.)",
              "ab": "A/B p_matching, both orders (no judge, ± s.e.)"}
    panels = [(measure, f"{measure}_sem", label, correlation[f"correlation_{measure}"]["all_finetunes"])
              for measure, label in labels.items() if "all_finetunes" in correlation.get(f"correlation_{measure}", {})]
    figure, axes = plt.subplots(1, len(panels), figsize=(5.8 * len(panels), 4.4), squeeze=False)
    for axis, (metric, sem, label, stats) in zip(axes[0], panels):
        scored = [m for m in models if m.get(metric) is not None]
        for kind, marker in (("adapter", "o"), ("checkpoint", "s")):
            points = [m for m in scored if m["kind"] == kind]
            if points:
                axis.errorbar([m["projection"] for m in points], [m[metric] for m in points],
                              yerr=[m[sem] or 0.0 for m in points], fmt=marker, capsize=3,
                              label="LoRA finetunes" if kind == "adapter" else "dense finetunes")
        # Labels of points close along x take turns at four heights, so long names do not overprint.
        xs = [m["projection"] for m in scored]
        span, previous_x, turn = (max(xs) - min(xs)) or 1.0, None, 0
        for model in sorted(scored, key=lambda m: m["projection"]):
            close = previous_x is not None and model["projection"] - previous_x < 0.15 * span
            turn = turn + 1 if close else 0
            axis.annotate(model["name"], (model["projection"], model[metric]), fontsize=6,
                          xytext=(3, (4, -11, 14, -21)[turn % 4]), textcoords="offset points")
            previous_x = model["projection"]
        axis.set(xlabel=f"weight projection onto the {diff.metadata.get('trait', 'persona')} diff", ylabel=label,
                 title=f"Pearson r = {stats['pearson_r']:.3f} (p = {stats['pearson_p']:.2g}), "
                       f"Spearman ρ = {stats['spearman_rho']:.2f} (p = {stats['spearman_p']:.2g}), n = {stats['n']}")
        axis.title.set_fontsize(8)
        axis.xaxis.set_major_locator(MaxNLocator(nbins=5))  # projections are ~1e-2: the default ticks overprint
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    return save_figure(figure, path)


def main():
    args = parse_args()
    started = time.time()
    output_path = check_writable(args.output_path, "--output_path")
    diffs = [lu.load_lora_diff(path) for path in args.lora_diff_path]
    labels = diff_labels(args.lora_diff_path)
    null_diffs = dict(zip(diff_labels(args.null_diffs), (lu.load_lora_diff(path) for path in args.null_diffs)))
    original = lu.SafetensorsCheckpoint(resolve_model_folder(args.original_model))
    for each in [*diffs, *null_diffs.values()]:
        lu.check_diff_fits(each, original)
    diff = diffs[0]
    folders = model_folders(args)
    with OutputLock(output_path, "--output_path"):
        models = []
        for folder in tqdm(folders, desc="models", disable=len(folders) < 2):
            model = lu.project_finetune(original, folder, diff)
            if len(diffs) > 1:
                model["by_diff"] = {labels[0]: {"projection": model["projection"], "cosine": model["cosine"]}}
                for label, other in zip(labels[1:], diffs[1:]):
                    projected = lu.project_finetune(original, folder, other)
                    model["by_diff"][label] = {"projection": projected["projection"], "cosine": projected["cosine"]}
            models.append(model)
        if args.null_draws:  # all finetunes at once: each module's draws are generated once
            nulls = lu.project_finetunes_null(original, folders, dict(zip(labels, diffs)), null_diffs, args.null_draws, args.null_seed)
            for model, null in zip(models, nulls):
                model["null"] = null
        output = models[0] if len(models) == 1 and not args.behavior_scores else {"models": models}
        if args.behavior_scores:
            output.update(correlate(models, args.behavior_scores))
            for model in models:
                model.setdefault("by_diff", {labels[0]: {"projection": model["projection"], "cosine": model["cosine"]}})
            output["correlations_by_diff"] = correlate_by_diff(models, labels)
            output["plot"] = str(plot_scatter(models, output, diff, output_path.with_suffix(".png")))
        if args.behavior_scores or args.null_draws:
            adjust_for_multiplicity(output)
        output["inputs"] = {"original_model": model_label(args.original_model), "original_bytes": original.nbytes(),
                            "lora_diff_path": args.lora_diff_path[0], "diff_trait": diff.metadata.get("trait"),
                            "diff_norm": diff.norm(), "diff_modules": len(diff)}
        if len(diffs) > 1 or args.null_draws:
            output["inputs"]["diffs"] = {label: {"path": path, "trait": d.metadata.get("trait"), "norm": d.norm()}
                                         for label, path, d in zip(labels, args.lora_diff_path, diffs)}
        if args.null_draws:
            output["null_design"] = {"draws": args.null_draws, "seed": args.null_seed, "stream": lu.PROJECTION_NULL_STREAM,
                                     "null_diffs": {label: path for label, path in zip(null_diffs, args.null_diffs)},
                                     "draws_are": "Gaussian low-rank factors with each persona diff's per-module ranks, scaled to "
                                                  "its per-module Frobenius norms; the same draws for every finetune"}
        write_json(output_path, output)
        write_manifest(output_path.parent, args, started, name=f"{output_path.stem}.manifest.json")
    print(f"{'model':40s} {'kind':10s} {'projection':>11s} {'cosine':>8s} {'shared init':>11s}")
    for model in models:
        shared = f"{model['shared_row_space']:11.3f}" if "shared_row_space" in model else f"{'—':>11s}"
        print(f"{model['name'][:40]:40s} {model['kind']:10s} {model['projection']:11.5f} {model['cosine']:8.4f} {shared}")
        for label, null in model.get("null", {}).items():
            print(f"  {label}: projection {null['projection']:+.5f}, z {null['null']['z']:+.2f} against {null['null']['draws']} random "
                  f"draws (two-sided p {null['null']['p_two_sided']:.3g}); {null['null_diffs_reaching']} of {len(null['null_diffs'])} "
                  "other traits' diffs reach it in absolute value")
    for measure, label in MEASURES.items():
        for group, c in output.get(f"correlation_{measure}", {}).items():
            if isinstance(c, dict):
                print(f"{label} vs projection, {group.replace('_', ' ')} (n = {c['n']}): Pearson r = {c['pearson_r']:.3f} "
                      f"(p = {c['pearson_p']:.3g}), Spearman ρ = {c['spearman_rho']:.3f} (p = {c['spearman_p']:.3g})")
    for diff_label, by_measure in output.get("correlations_by_diff", {}).items():
        for measure, stats in by_measure.items():
            partial = stats.get("partial_correlation_given_fraction")
            if partial:
                print(f"{diff_label}, {MEASURES[measure]}: partial r given the mixing fraction = {partial['statistic']:.3f} "
                      f"(p = {partial['p']:.3g}, n = {partial['n']})")
    print(f"wrote {output_path}")


if __name__ == "__main__":
    run_cli(main)
