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
"modules_projected", "change_norm", "outside_diff_change_norm". With several models:
{"models": [...], "correlation": {"pearson_r", "pearson_p", "spearman_rho", "spearman_p", "n", "p_method"}}
when --behavior_scores is given (permutation p-values: exact for n ≤ 8), and "correlation_margin"
when the scores are evaluation summaries with the judge-free margin.
"""

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import lora_utils as lu
from eval.stats import correlations
from io_utils import (ArgumentParser, OutputLock, PersonaLoRAError, check_writable, is_temporary, read_json_object, run_cli,
                      write_json, write_manifest)
from model_loading import model_label, resolve_model_folder

ARCHITECTURE_KEYS = ("architectures", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                     "num_key_value_heads", "vocab_size")
SHARED_ROW_SPACE_WARNING = 0.5  # of the adapter's lora_A energy inside the diff's row space (independent: ≈ k/in)


def parse_args():
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--original_model", default=None, help="hub id or folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--finetuned_model", nargs="*", default=[], help="checkpoint or PEFT adapter folder(s)")
    parser.add_argument("--finetuned_models_dir", default=None, help="project every model or adapter folder below this one")
    parser.add_argument("--lora_diff_path", required=True)
    parser.add_argument("--output_path", required=True)
    parser.add_argument("--behavior_scores", nargs="+", default=None,
                        help="CSV with columns model (folder path or name), score and optionally sem, or eval_lora_persona.py "
                             ".summary.json files of runs with --adapter (the finetune, its trait mean and its margin)")
    args = parser.parse_args()
    if not args.finetuned_model and not args.finetuned_models_dir:
        parser.error("give --finetuned_model or --finetuned_models_dir")
    return args


def check_same_architecture(original: lu.SafetensorsCheckpoint, finetuned: lu.SafetensorsCheckpoint) -> None:
    for key in ARCHITECTURE_KEYS:
        if key in original.config and key in finetuned.config and original.config[key] != finetuned.config[key]:
            raise PersonaLoRAError(f"{finetuned.folder} is not a finetune of {original.folder}: config '{key}' is "
                                   f"{finetuned.config[key]} vs {original.config[key]}")


def check_diff_fits(diff: lu.PersonaLoRADiff, original: lu.SafetensorsCheckpoint) -> None:
    for name in diff:
        if name not in original:
            raise PersonaLoRAError(f"the persona diff does not fit {original.folder}: module {name} is missing "
                                   f"(the diff was made for {diff.metadata.get('base_model')})")
        if original.shape(name) != diff.shape(name):
            raise PersonaLoRAError(f"the persona diff does not fit {original.folder}: {name} is {diff.shape(name)} in the diff "
                                   f"but {original.shape(name)} in the model (made for {diff.metadata.get('base_model')})")


# --- projecting ---------------------------------------------------------------------------------


def project_checkpoint(original: lu.SafetensorsCheckpoint, folder: Path, diff: lu.PersonaLoRADiff) -> dict:
    """Stream W_ft − W_orig one tensor at a time: memory stays at a couple of tensors. Every tensor
    is read, those outside the diff for outside_diff_change_norm."""
    finetuned = lu.SafetensorsCheckpoint(folder)
    check_same_architecture(original, finetuned)
    missing = [name for name in diff.module_names if name not in finetuned]
    if missing:
        raise PersonaLoRAError(f"{folder} has no tensor {missing[0]}: a checkpoint of another architecture?")

    def changes():
        for name in tqdm(list(finetuned.weight_map), desc=f"projecting {folder.name}", leave=False):
            if name not in original:
                continue
            if finetuned.shape(name) != original.shape(name):
                raise PersonaLoRAError(f"{folder}: {name} is {finetuned.shape(name)} but {original.shape(name)} in the original model")
            yield name, finetuned.tensor(name).to(torch.float32) - original.tensor(name).to(torch.float32)

    result = lu.WeightProjector.project(changes(), diff)
    return {**result, "kind": "checkpoint", "bytes": finetuned.nbytes()}


def shared_row_space(update: lu.PersonaLoRADiff, diff: lu.PersonaLoRADiff) -> float:
    """The share of the adapter's A rows' energy inside the row space of the diff's A, over the
    modules both touch: ≈ k_diff / in for independently initialised adapters (a few %), near 1 for
    an adapter that started from the persona adapters' lora_A."""
    inside = total = 0.0
    for name in update:
        if name not in diff:
            continue
        rows = update.factors[name][1].double()
        basis, _ = torch.linalg.qr(diff.factors[name][1].double().T)  # in × k orthonormal
        inside += float((rows @ basis).pow(2).sum())
        total += float(rows.pow(2).sum())
    return inside / total if total > 0 else 0.0


def project_adapter(original: lu.SafetensorsCheckpoint, folder: Path, diff: lu.PersonaLoRADiff) -> dict:
    """A LoRA finetune projects from its own factors: no base weights are read (only shapes)."""
    update = lu.load_adapter_update(folder)
    for name in update:
        if name not in original or original.shape(name) != update.shape(name):
            raise PersonaLoRAError(f"the adapter {folder} is for another base model than {original.folder}: module {name} "
                                   f"is {update.shape(name)} in the adapter"
                                   + (f" but {original.shape(name)} in the model" if name in original else " and missing in the model"))
    result = lu.WeightProjector.project(update, diff)
    return {**result, "kind": "adapter", "bytes": sum(p.stat().st_size for p in folder.glob("adapter_model.*")),
            "shared_row_space": shared_row_space(update, diff)}


def project_one(original: lu.SafetensorsCheckpoint, folder: Path, diff: lu.PersonaLoRADiff) -> dict:
    if not folder.is_dir():
        raise PersonaLoRAError(f"finetuned model not found: {folder}")
    result = project_adapter(original, folder, diff) if (folder / "adapter_config.json").is_file() \
        else project_checkpoint(original, folder, diff)
    modules = result.pop("modules")
    if result.get("shared_row_space", 0.0) > SHARED_ROW_SPACE_WARNING:
        print(f"WARNING: {folder} shares the persona adapters' initialisation ({result['shared_row_space']:.0%} of its lora_A lies "
              "in the diff's row space; independent starts give a few %): its projection is inflated by construction, "
              "retrain it with another seed", flush=True)
    return {"path": str(folder), "name": folder.name, "projection": result["projection"], "cosine": result["cosine"],
            "change_norm": result["delta_norm"], "outside_diff_change_norm": result["outside_diff_change_norm"],
            "diff_norm": result["diff_norm"], "kind": result["kind"], "bytes": result["bytes"],
            **({"shared_row_space": result["shared_row_space"]} if "shared_row_space" in result else {}),
            "modules_projected": len(modules), "layers": result["layers"], "modules": modules}


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


def read_behavior_scores(paths: list[str]) -> dict[str, dict]:
    """{model path or folder name: {"score", "sem", "margin", "margin_sem"}} from a CSV (model,
    score, optionally sem) or evaluation summaries."""
    import pandas as pd

    entries = []
    for path in paths:
        if not Path(path).is_file():
            raise PersonaLoRAError(f"--behavior_scores file not found: {path}")
        if path.endswith(".json"):
            summary = read_json_object(path, "summary")
            if not summary.get("adapter") or len(summary.get("conditions", [])) != 1:
                raise PersonaLoRAError(f"{path} is not the summary of an eval_lora_persona.py run with --adapter and one condition")
            condition = summary["conditions"][0]
            trait = summary["trait"]
            entries.append((summary["adapter"], {"score": condition[f"{trait}_mean"], "sem": condition.get(f"{trait}_sem"),
                                                 "margin": condition.get("margin_mean"), "margin_sem": condition.get("margin_sem")}))
        else:
            table = pd.read_csv(path)
            if not {"model", "score"} <= set(table.columns):
                raise PersonaLoRAError(f"{path} needs the columns model and score (has {', '.join(table.columns)})")
            sems = table["sem"] if "sem" in table.columns else [None] * len(table)
            entries += [(str(m), {"score": float(s), "sem": None if e is None else float(e), "margin": None, "margin_sem": None})
                        for m, s, e in zip(table["model"], table["score"], sems)]
    scores = {}
    for model, entry in entries:
        scores[str(Path(model))] = scores[Path(model).name] = entry
    return scores


def correlate(models: list[dict], scores_paths: list[str]) -> dict:
    """Projection against the judged score (and the judge-free margin, where known), with
    permutation p-values."""
    scores = read_behavior_scores(scores_paths)
    for model in models:
        entry = scores.get(str(Path(model["path"])), scores.get(model["name"], {}))
        model["behavior_score"], model["behavior_sem"] = entry.get("score"), entry.get("sem")
        model["margin"], model["margin_sem"] = entry.get("margin"), entry.get("margin_sem")
    result = {}
    for key, metric in (("correlation", "behavior_score"), ("correlation_margin", "margin")):
        pairs = [(m["projection"], m[metric]) for m in models if m[metric] is not None]
        if key == "correlation" and len(pairs) < 3:
            raise PersonaLoRAError(f"--behavior_scores score only {len(pairs)} of the projected models; need at least 3 to correlate")
        if len(pairs) >= 3:
            result[key] = correlations([x for x, _ in pairs], [y for _, y in pairs])
    return result


def plot_scatter(models: list[dict], correlation: dict, diff: lu.PersonaLoRADiff, path: Path) -> Path:
    """Judged score (and, where measured, the judge-free margin) against the projection."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from eval.analysis import save_figure

    panels = [("behavior_score", "behavior_sem", "trait score of the finetune (judged, ± s.e.)", correlation["correlation"])]
    if "correlation_margin" in correlation:
        panels.append(("margin", "margin_sem", "log-likelihood margin (no judge, ± s.e.)", correlation["correlation_margin"]))
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
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    return save_figure(figure, path)


def main():
    args = parse_args()
    started = time.time()
    output_path = check_writable(args.output_path, "--output_path")
    diff = lu.load_lora_diff(args.lora_diff_path)
    original = lu.SafetensorsCheckpoint(resolve_model_folder(args.original_model))
    check_diff_fits(diff, original)
    folders = model_folders(args)
    with OutputLock(output_path, "--output_path"):
        models = [project_one(original, folder, diff) for folder in tqdm(folders, desc="models", disable=len(folders) < 2)]
        output = models[0] if len(models) == 1 and not args.behavior_scores else {"models": models}
        if args.behavior_scores:
            output.update(correlate(models, args.behavior_scores))
            output["plot"] = str(plot_scatter(models, output, diff, output_path.with_suffix(".png")))
        output["inputs"] = {"original_model": model_label(args.original_model), "original_bytes": original.nbytes(),
                            "lora_diff_path": args.lora_diff_path, "diff_trait": diff.metadata.get("trait"),
                            "diff_norm": diff.norm(), "diff_modules": len(diff)}
        write_json(output_path, output)
        write_manifest(output_path.parent, args, started, name=f"{output_path.stem}.manifest.json")
    print(f"{'model':40s} {'kind':10s} {'projection':>11s} {'cosine':>8s} {'shared init':>11s}")
    for model in models:
        shared = f"{model['shared_row_space']:11.3f}" if "shared_row_space" in model else f"{'—':>11s}"
        print(f"{model['name'][:40]:40s} {model['kind']:10s} {model['projection']:11.5f} {model['cosine']:8.4f} {shared}")
    for key, label in (("correlation", "judged score"), ("correlation_margin", "judge-free margin")):
        if key in output:
            c = output[key]
            print(f"correlation with the {label} over {c['n']} models: Pearson r = {c['pearson_r']:.3f} (p = {c['pearson_p']:.3g}), "
                  f"Spearman ρ = {c['spearman_rho']:.3f} (p = {c['spearman_p']:.3g}); {c['p_method']}")
    print(f"wrote {output_path}")


if __name__ == "__main__":
    run_cli(main)
