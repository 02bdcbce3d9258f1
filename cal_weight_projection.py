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

A finetuned model is either a PEFT adapter folder, whose change is its own exact low-rank update
(the base weights are not read at all), or a full checkpoint (safetensors, sharded or not), which
is streamed one tensor at a time from memory-mapped files: two 70B models never sit in memory.

Output JSON, per model: "projection", "cosine" (of the weight change with ΔW), "layers"
({layer: {projection, cosine, inner, delta_norm, diff_norm}}), "modules" (the same per module),
"kind" (adapter | checkpoint), "path", "modules_projected", "change_norm". With several models:
{"models": [...], "correlation": {"pearson_r", "pearson_p", "spearman_rho", "spearman_p", "n"}}
when --behavior_scores (CSV with columns model, score) is given.
"""

import argparse
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import lora_utils as lu
from io_utils import PersonaLoRAError, read_json_object, run_cli, write_json, write_manifest
from model_loading import model_label, resolve_model_folder


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original_model", default=None, help="hub id or folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--finetuned_model", nargs="*", default=[], help="checkpoint or PEFT adapter folder(s)")
    parser.add_argument("--finetuned_models_dir", default=None, help="project every model or adapter folder below this one")
    parser.add_argument("--lora_diff_path", required=True)
    parser.add_argument("--output_path", required=True)
    parser.add_argument("--behavior_scores", nargs="+", default=None,
                        help="CSV with columns model (folder path or name) and score, or eval_lora_persona.py "
                             ".summary.json files of runs with --adapter (the adapter and its trait mean)")
    args = parser.parse_args()
    if not args.finetuned_model and not args.finetuned_models_dir:
        parser.error("give --finetuned_model or --finetuned_models_dir")
    return args


ARCHITECTURE_KEYS = ("architectures", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                     "num_key_value_heads", "vocab_size")


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
    """Stream W_ft − W_orig one module at a time: memory stays at a couple of tensors."""
    finetuned = lu.SafetensorsCheckpoint(folder)
    check_same_architecture(original, finetuned)

    def changes():
        for name in tqdm(diff.module_names, desc=f"projecting {folder.name}", leave=False):
            if name not in finetuned:
                raise PersonaLoRAError(f"{folder} has no tensor {name}: a checkpoint of another architecture?")
            if finetuned.shape(name) != original.shape(name):
                raise PersonaLoRAError(f"{folder}: {name} is {finetuned.shape(name)} but {original.shape(name)} in the original model")
            yield name, finetuned.tensor(name).to(torch.float32) - original.tensor(name).to(torch.float32)

    result = lu.WeightProjector.project(changes(), diff)
    return {**result, "kind": "checkpoint", "bytes": finetuned.nbytes()}


def project_adapter(original: lu.SafetensorsCheckpoint, folder: Path, diff: lu.PersonaLoRADiff) -> dict:
    """A LoRA finetune projects from its own factors: no base weights are read (only shapes)."""
    update = lu.load_adapter_update(folder)
    for name in update:
        if name not in original or original.shape(name) != update.shape(name):
            raise PersonaLoRAError(f"the adapter {folder} is for another base model than {original.folder}: module {name} "
                                      f"is {update.shape(name)} in the adapter"
                                      + (f" but {original.shape(name)} in the model" if name in original else " and missing in the model"))
    result = lu.WeightProjector.project(update, diff)
    return {**result, "kind": "adapter", "bytes": sum(p.stat().st_size for p in folder.glob("adapter_model.*"))}


def project_one(original: lu.SafetensorsCheckpoint, folder: Path, diff: lu.PersonaLoRADiff) -> dict:
    if not folder.is_dir():
        raise PersonaLoRAError(f"finetuned model not found: {folder}")
    result = project_adapter(original, folder, diff) if (folder / "adapter_config.json").is_file() \
        else project_checkpoint(original, folder, diff)
    modules = result.pop("modules")
    return {"path": str(folder), "name": folder.name, "projection": result["projection"], "cosine": result["cosine"],
            "change_norm": result["delta_norm"], "diff_norm": result["diff_norm"], "kind": result["kind"],
            "bytes": result["bytes"], "modules_projected": len(modules), "layers": result["layers"], "modules": modules}


def model_folders(args) -> list[Path]:
    folders = [Path(p) for p in args.finetuned_model]
    if args.finetuned_models_dir:
        root = Path(args.finetuned_models_dir)
        if not root.is_dir():
            raise PersonaLoRAError(f"--finetuned_models_dir {root} is not a folder")
        found = sorted({p.parent for pattern in ("adapter_config.json", "model.safetensors", "model.safetensors.index.json")
                        for p in root.rglob(pattern)})
        if not found:
            raise PersonaLoRAError(f"no model or adapter folder below {root}")
        folders += found
    return folders


def read_behavior_scores(paths: list[str]) -> dict[str, tuple[float, float | None]]:
    """{model path or folder name: (trait score, its standard error or None)} from a CSV (model,
    score, optionally sem) or evaluation summaries."""
    import pandas as pd

    pairs = []
    for path in paths:
        if not Path(path).is_file():
            raise PersonaLoRAError(f"--behavior_scores file not found: {path}")
        if path.endswith(".json"):
            summary = read_json_object(path, "summary")
            if not summary.get("adapter") or len(summary.get("conditions", [])) != 1:
                raise PersonaLoRAError(f"{path} is not the summary of an eval_lora_persona.py run with --adapter and one condition")
            condition = summary["conditions"][0]
            pairs.append((summary["adapter"], condition[f"{summary['trait']}_mean"], condition.get(f"{summary['trait']}_sem")))
        else:
            table = pd.read_csv(path)
            if not {"model", "score"} <= set(table.columns):
                raise PersonaLoRAError(f"{path} needs the columns model and score (has {', '.join(table.columns)})")
            sems = table["sem"] if "sem" in table.columns else [None] * len(table)
            pairs += list(zip(table["model"].astype(str), table["score"], sems))
    scores = {}
    for model, score, sem in pairs:
        scores[str(Path(model))] = scores[Path(model).name] = (float(score), None if sem is None else float(sem))
    return scores


def correlate(models: list[dict], scores_paths: list[str]) -> dict:
    from scipy import stats

    scores = read_behavior_scores(scores_paths)
    for model in models:
        model["behavior_score"], model["behavior_sem"] = scores.get(str(Path(model["path"])), scores.get(model["name"], (None, None)))
    pairs = [(m["projection"], m["behavior_score"]) for m in models if m["behavior_score"] is not None]
    if len(pairs) < 3:
        raise PersonaLoRAError(f"--behavior_scores score only {len(pairs)} of the projected models; need at least 3 to correlate")
    xs, ys = [x for x, _ in pairs], [y for _, y in pairs]
    pearson, spearman = stats.pearsonr(xs, ys), stats.spearmanr(xs, ys)
    return {"n": len(pairs), "pearson_r": float(pearson.statistic), "pearson_p": float(pearson.pvalue),
            "spearman_rho": float(spearman.statistic), "spearman_p": float(spearman.pvalue)}


def plot_scatter(models: list[dict], correlation: dict, diff: lu.PersonaLoRADiff, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from eval.analysis import save_figure

    scored = [m for m in models if m.get("behavior_score") is not None]
    figure, axis = plt.subplots(figsize=(5.5, 4.2))
    axis.errorbar([m["projection"] for m in scored], [m["behavior_score"] for m in scored],
                  yerr=[m["behavior_sem"] or 0.0 for m in scored], fmt="o", capsize=3)
    # Labels of points close along x take turns at four heights, so long names do not overprint.
    xs = [m["projection"] for m in scored]
    span, previous_x, turn = (max(xs) - min(xs)) or 1.0, None, 0
    for model in sorted(scored, key=lambda m: m["projection"]):
        close = previous_x is not None and model["projection"] - previous_x < 0.15 * span
        turn = turn + 1 if close else 0
        axis.annotate(model["name"], (model["projection"], model["behavior_score"]), fontsize=7,
                      xytext=(3, (4, -11, 14, -21)[turn % 4]), textcoords="offset points")
        previous_x = model["projection"]
    axis.set(xlabel=f"weight projection onto the {diff.metadata.get('trait', 'persona')} diff",
             ylabel="trait score of the finetune (± s.e.)",
             title=f"Pearson r = {correlation['pearson_r']:.3f} (p = {correlation['pearson_p']:.2g}), n = {correlation['n']}")
    axis.grid(alpha=0.3)
    return save_figure(figure, path)


def main():
    args = parse_args()
    started = time.time()
    diff = lu.load_lora_diff(args.lora_diff_path)
    original = lu.SafetensorsCheckpoint(resolve_model_folder(args.original_model))
    check_diff_fits(diff, original)
    folders = model_folders(args)
    models = [project_one(original, folder, diff) for folder in tqdm(folders, desc="models", disable=len(folders) < 2)]
    output = models[0] if len(models) == 1 and not args.behavior_scores else {"models": models}
    if args.behavior_scores:
        output["correlation"] = correlate(models, args.behavior_scores)
        output["plot"] = str(plot_scatter(models, output["correlation"], diff, Path(args.output_path).with_suffix(".png")))
    output["inputs"] = {"original_model": model_label(args.original_model), "original_bytes": original.nbytes(),
                        "lora_diff_path": args.lora_diff_path, "diff_trait": diff.metadata.get("trait"),
                        "diff_norm": diff.norm(), "diff_modules": len(diff)}
    write_json(args.output_path, output)
    write_manifest(Path(args.output_path).parent, args, started, name=f"{Path(args.output_path).stem}.manifest.json")
    print(f"{'model':40s} {'kind':10s} {'projection':>11s} {'cosine':>8s}")
    for model in models:
        print(f"{model['name'][:40]:40s} {model['kind']:10s} {model['projection']:11.5f} {model['cosine']:8.4f}")
    if "correlation" in output:
        c = output["correlation"]
        print(f"correlation with behaviour over {c['n']} models: Pearson r = {c['pearson_r']:.3f} (p = {c['pearson_p']:.3g}), "
              f"Spearman ρ = {c['spearman_rho']:.3f} (p = {c['spearman_p']:.3g})")
    print(f"wrote {args.output_path}")


if __name__ == "__main__":
    run_cli(main)
