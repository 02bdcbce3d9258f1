"""Multi-persona composition (research question 4): several traits' diffs merged at once, each
trait judged on its own questions; does each trait's score follow its own coefficient?

    python scripts/composition.py grid --n_diffs 3 --levels 0 2
    python scripts/composition.py likelihood --output_dir results/exp4_composition --traits evil sycophancy hallucination --levels 0 2
    python scripts/composition.py summarize --output_dir results/exp4_composition --traits evil sycophancy hallucination

`grid` prints every combination of --levels for --n_diffs diffs (a full factorial), flattened in
groups of one coefficient per diff: the form `eval_lora_persona.py --lora_coef` reads.

`likelihood` is a judge-free readout of the same grid. The unsteered model answers each trait's
held-out questions under the trait's pos and under its neg system prompts (reference answers);
then, for every combination merged, the trait's log-likelihood margin is the mean log-probability
per token the model gives the pos answers minus the neg answers, with no system prompt (paired by
question; s.e. over questions). Steering toward a trait should raise its margin. Teacher-forced, so
no sampling noise in the steered model and no judge: it still measures a trait that a weak judge
cannot see. Writes likelihood.json.

`summarize` reads eval_<trait>.summary.json for each judged trait and fits, per judged trait, the
additive model  score = β₀ + Σⱼ βⱼ·cⱼ  over all combinations. β is a matrix (judged trait × diff):
its diagonal is each trait's response to its own coefficient, the rest is cross-talk. Standard
errors propagate each combination's standard error through the least-squares fit; the additive
model's R² says how far the effects simply add (in a two-level factorial the residual is exactly
the interactions). Writes summary.json, composition.png (each trait's score and coherence against
its own coefficient, one line per setting of the others) and slopes.png (the β matrix beside the
traits' similarity in weight space and in activation space).
"""

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm.auto import tqdm  # noqa: E402

import lora_utils as lu  # noqa: E402
from eval.evaluate import add_generation_args  # noqa: E402
from eval.stats import additive_fit, mean_and_sem, paired_additive_slope_sem  # noqa: E402
from io_utils import PersonaLoRAError, read_json_object, run_cli, write_json, write_manifest  # noqa: E402
from model_loading import default_persona_paths, load_model_and_tokenizer, model_label  # noqa: E402


def factorial(levels: list[float], n_diffs: int) -> list[tuple[float, ...]]:
    return list(itertools.product(levels, repeat=n_diffs))


def print_grid(args) -> None:
    print(" ".join(f"{c:g}" for combination in factorial(args.levels, args.n_diffs) for c in combination))


def combination_margins(model, tokenizer, names, diffs, combination, references) -> dict:
    """Every trait's margin with the diffs merged at these coefficients (restored afterwards)."""
    from eval.evaluate import mean_and_sem
    from eval.generation import response_log_likelihoods

    points = {}
    with lu.LoRASteerer.compose(model, [(d, c) for d, c in zip(diffs, combination) if c != 0]):
        for t in names:
            per_side = {}
            for side, records in references[t].items():
                # Small batches (the default): full-vocabulary logits of long answers are the memory here.
                scores = response_log_likelihoods(model, tokenizer, [r["messages"] for r in records])
                by_question = {}
                for record, score in zip(records, scores):
                    by_question.setdefault(record["question_id"], []).append(score)
                per_side[side] = {q: sum(v) / len(v) for q, v in by_question.items()}
            margins = {q: per_side["pos"][q] - per_side["neg"][q] for q in per_side["pos"]}
            mean, sem, n = mean_and_sem(list(margins.values()))
            points[t] = {"coefs": dict(zip(names, combination)), "margin_mean": mean, "margin_sem": sem, "questions": n,
                         "margin_by_question": margins, "pos_log_likelihood": sum(per_side["pos"].values()) / n,
                         "neg_log_likelihood": sum(per_side["neg"].values()) / n}
    return points


def likelihood(args) -> None:
    from eval.evaluate import Condition, fill_generation_defaults, generate_condition
    from eval.traits import load_trait

    started = time.time()
    fill_generation_defaults(args)
    out, names = Path(args.output_dir), args.traits
    traits = {t: load_trait(t) for t in names}
    diff_paths = args.lora_diff_path or [default_persona_paths(args.model, t)[0] for t in names]
    if len(diff_paths) != len(names):
        raise PersonaLoRAError(f"--lora_diff_path names {len(diff_paths)} diffs for {len(names)} --traits: give one per trait, in order")
    diffs = [lu.load_lora_diff(p) for p in diff_paths]
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype)
    for diff in diffs:
        lu.LoRAMerger(model).check(diff)  # a diff for another model fails before any generation
    # Reference answers from the unsteered model under each trait's own system prompts (cached, resumable).
    references = {t: {side: generate_condition(args, model, tokenizer, trait, Condition(f"prompted_{side}", "system_prompt",
                                                                                        instruction_type=side), out / ".likelihood.work")
                      for side in ("pos", "neg")} for t, trait in traits.items()}

    # Each combination's margins are kept as they finish (an interrupted run resumes); the key holds
    # everything they depend on: the diffs' content, the reference answers, the model and its dtype.
    import hashlib

    from eval.evaluate import file_identity

    depends_on = {"diffs": [file_identity(p)["sha256"] for p in diff_paths], "model": args.model, "dtype": str(model.dtype),
                  "references": hashlib.sha256(json.dumps(references, sort_keys=True).encode()).hexdigest()}
    points = {t: [] for t in names}
    for combination in tqdm(factorial(args.levels, len(names)), desc="likelihood margins"):
        key = hashlib.sha256(json.dumps({**depends_on, "combination": combination}).encode()).hexdigest()[:12]
        finished = out / ".likelihood.work" / f"margins-{key}.json"
        if not finished.is_file():
            write_json(finished, combination_margins(model, tokenizer, names, diffs, combination, references))
        for t, point in read_json_object(finished, "finished margins").items():
            points[t].append(point)
    write_json(out / "likelihood.json", {
        "traits": names, "model": model_label(args.model), "diffs": [str(p) for p in diff_paths],
        "measure": "mean log-probability per response token of the trait's pos-prompted reference answers minus its "
                   "neg-prompted ones (unsteered model's answers to the held-out questions), scored without the system prompt",
        "points": points})
    write_manifest(out, args, started, name="likelihood.manifest.json", outputs={"likelihood": str(out / "likelihood.json")})
    for t in names:
        print(f"{t}: margin " + ", ".join(f"{'/'.join(f'{c:g}' for c in p['coefs'].values())} {p['margin_mean']:+.4f}"
                                          for p in points[t]))


def read_points(out: Path, trait: str, names: list[str]) -> tuple[dict, list[dict]]:
    path = out / f"eval_{trait}.summary.json"
    summary = read_json_object(path, "evaluation summary")
    points = [c for c in summary.get("conditions", []) if isinstance(c.get("coefs"), dict)]
    if not points or any(set(p["coefs"]) != set(names) for p in points):
        raise PersonaLoRAError(f"{path} holds no composition of exactly the diffs {', '.join(names)}: "
                                  "run eval_lora_persona.py with one --lora_diff_path per trait and grouped --lora_coef")
    return summary, points


def read_margins(out: Path, names: list[str]) -> dict | None:
    """likelihood.json's points per trait, if `likelihood` ran for exactly these traits."""
    path = out / "likelihood.json"
    if not path.is_file():
        return None
    report = read_json_object(path, "likelihood margins")
    if report.get("traits") != names:
        raise PersonaLoRAError(f"{path} is for the traits {report.get('traits')}, not {names}: rerun composition.py likelihood")
    return report["points"]


def summarize(args) -> None:
    started = time.time()
    out, names = Path(args.output_dir), args.traits
    judged, fits = {}, {}
    for trait in names:
        summary, points = read_points(out, trait, names)
        judged[trait] = {"judge": summary.get("judge_description"), "judge_quality": summary.get("judge_quality"), "points": points}
        fits[trait] = {"trait_score": additive_fit(points, names, trait), "coherence": additive_fit(points, names, "coherence")}
    margins = read_margins(out, names)
    for trait, points in (margins or {}).items():
        fits[trait]["likelihood_margin"] = {**additive_fit(points, names, "margin"),
                                            "slope_sem": paired_additive_slope_sem(points, names, "margin_by_question"),
                                            "slope_sem_kind": "paired by question"}

    similarity = None
    paths = [default_persona_paths(args.model, t) for t in names]
    if all(d.is_file() and v.is_file() for d, v in paths):
        from eval.activations import load_vector
        from eval.analysis import trait_similarity

        loaded = {t: (lu.load_lora_diff(d), load_vector(v)) for t, (d, v) in zip(names, paths)}
        # The vectors hold L+1 rows (embeddings, then each block); default: two thirds of the depth, as the steering scripts.
        args.layer = args.layer or round(2 * (next(iter(loaded.values()))[1].shape[0] - 1) / 3)
        similarity = trait_similarity(loaded, args.layer)

    own = {t: fits[t]["trait_score"]["slope"][t] for t in names}
    cross = {t: max((abs(fits[t]["trait_score"]["slope"][o]) for o in names if o != t), default=float("nan")) for t in names}
    headline = {t: {"own_slope": own[t], "own_slope_sem": fits[t]["trait_score"]["slope_sem"][t], "largest_cross_slope": cross[t],
                    "additive_r2": fits[t]["trait_score"]["additive_r2"],
                    "judge_held_out_auroc": (judged[t]["judge_quality"] or {}).get("held_out_auroc")} for t in names}
    if margins:
        for t in names:
            fit = fits[t]["likelihood_margin"]
            headline[t].update(own_margin_slope=fit["slope"][t], own_margin_slope_sem=fit["slope_sem"][t],
                               largest_cross_margin_slope=max(abs(fit["slope"][o]) for o in names if o != t) if len(names) > 1 else None,
                               margin_additive_r2=fit["additive_r2"])
    report = {"traits": names, "model": model_label(args.model), "headline": headline, "fits": fits,
              "judges": {t: {k: v for k, v in j.items() if k != "points"} for t, j in judged.items()},
              "trait_similarity": similarity}
    write_json(out / "summary.json", report)
    plot_composition(out / "composition.png", names, judged, margins)
    plot_slopes(out / "slopes.png", names, fits, similarity, args.layer)
    write_manifest(out, args, started, name="summary.manifest.json", outputs={"summary": str(out / "summary.json")})

    print("\nslope of each judged trait's score per unit of each diff's coefficient (± s.e.), additive-model R²")
    print(f"{'judged':14s} " + " ".join(f"{'coef ' + n:>18s}" for n in names) + f" {'R²':>6s}")
    for t in names:
        fit = fits[t]["trait_score"]
        print(f"{t:14s} " + " ".join(f"{fit['slope'][n]:+9.2f} ± {fit['slope_sem'][n]:5.2f} " for n in names)
              + f" {fit['additive_r2']:6.3f}")
    if margins:
        print("\nthe same for the judge-free log-likelihood margin (nats per token per unit coefficient)")
        for t in names:
            fit = fits[t]["likelihood_margin"]
            print(f"{t:14s} " + " ".join(f"{fit['slope'][n]:+9.4f} ± {fit['slope_sem'][n]:6.4f}" for n in names)
                  + f" {fit['additive_r2']:6.3f}")
    print(f"wrote {out / 'summary.json'}, {out / 'composition.png'}, {out / 'slopes.png'}")


def margin_changes(points: list[dict]) -> list[dict]:
    """Each combination's margin minus the unsteered one, per question, with the paired s.e.: the
    same reference answers are scored under every merge, so only the change is noisy."""
    # The unsteered model, or the grid's first combination when the levels leave out 0.
    unsteered = next((p for p in points if not any(p["coefs"].values())), points[0])["margin_by_question"]
    changes = []
    for p in points:
        mean, sem, _ = mean_and_sem([p["margin_by_question"][q] - unsteered[q] for q in unsteered])
        changes.append({"coefs": p["coefs"], "margin_change_mean": mean, "margin_change_sem": 0.0 if sem != sem else sem})
    return changes


def plot_composition(path: Path, names: list[str], judged: dict, margins: dict | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from eval.analysis import save_figure

    rows = [("judged", "{trait}", "{trait} score (judge AUROC {auroc})", "{trait} score (0–100)"),
            ("judged", "coherence", "coherence on {trait} questions", "coherence (0–100)")]
    if margins:
        rows.append(("margins", "margin_change", "{trait}: log-likelihood margin (judge-free)",
                     "margin − unsteered margin, nats/token"))
    figure, axes = plt.subplots(len(rows), len(names), figsize=(4.5 * len(names), 3.8 * len(rows)), squeeze=False)
    for column, trait in enumerate(names):
        others = [n for n in names if n != trait]
        auroc = (judged[trait]["judge_quality"] or {}).get("held_out_auroc")
        for row, (source, metric, title, ylabel) in enumerate(rows):
            points = judged[trait]["points"] if source == "judged" else margin_changes(margins[trait])
            metric = metric.format(trait=trait)
            for setting in sorted({tuple(p["coefs"][o] for o in others) for p in points}):
                line = sorted((p for p in points if tuple(p["coefs"][o] for o in others) == setting), key=lambda p: p["coefs"][trait])
                label = ", ".join(f"{o} {c:+g}" for o, c in zip(others, setting)) or "alone"
                axes[row][column].errorbar([p["coefs"][trait] for p in line], [p[f"{metric}_mean"] for p in line],
                                           yerr=[p[f"{metric}_sem"] for p in line], marker="o", capsize=3, label=label)
            axes[row][column].set(title=title.format(trait=trait, auroc="n/a" if auroc is None else f"{auroc:.2f}"),
                                  xlabel=f"{trait} coefficient", ylabel=ylabel.format(trait=trait))
            axes[row][column].grid(alpha=0.3)
            axes[row][column].legend(fontsize=7, title="other diffs", title_fontsize=7)
    figure.suptitle("Persona LoRAs merged together: each trait against its own coefficient "
                    "(parallel lines = effects add; vertical spread = cross-talk)", fontsize=10)
    figure.tight_layout()
    save_figure(figure, path)


def plot_slopes(path: Path, names: list[str], fits: dict, similarity: dict | None, layer: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from eval.analysis import save_figure

    panels = [("score slope per unit coefficient\n(row: judged trait, column: diff)",
               np.array([[fits[t]["trait_score"]["slope"][n] for n in names] for t in names]), "RdBu_r")]
    if "likelihood_margin" in fits[names[0]]:
        panels.append(("log-likelihood margin slope (judge-free)\n(row: trait measured, column: diff)",
                       np.array([[fits[t]["likelihood_margin"]["slope"][n] for n in names] for t in names]), "RdBu_r"))
    if similarity:
        panels.append(("cosine of diffs in weight space", np.array([[similarity["weight_space_cosine"][a][b] for b in names]
                                                                    for a in names]), "RdBu_r"))
        key = f"activation_space_cosine_layer{layer}"
        panels.append((f"cosine of persona vectors (layer {layer})", np.array([[similarity[key][a][b] for b in names]
                                                                               for a in names]), "RdBu_r"))
    figure, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4), squeeze=False)
    for axis, (title, matrix, cmap) in zip(axes[0], panels):
        limit = float(np.abs(matrix).max()) or 1.0
        image = axis.imshow(matrix, cmap=cmap, vmin=-limit, vmax=limit)
        for (i, j), value in np.ndenumerate(matrix):
            axis.text(j, i, f"{value:+.2f}" if limit > 0.5 else f"{value:+.3f}", ha="center", va="center", fontsize=9)
        axis.set(xticks=range(len(names)), yticks=range(len(names)), title=title)
        axis.set_xticklabels(names, rotation=30)
        axis.set_yticklabels(names)
        figure.colorbar(image, ax=axis, fraction=0.046)
    figure.tight_layout()
    save_figure(figure, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    grid = commands.add_parser("grid")
    grid.add_argument("--n_diffs", type=int, required=True)
    grid.add_argument("--levels", nargs="+", type=float, default=[0.0, 2.0])
    margins = commands.add_parser("likelihood")
    margins.add_argument("--output_dir", required=True)
    margins.add_argument("--traits", nargs="+", required=True, help="the composed traits")
    margins.add_argument("--lora_diff_path", nargs="+", default=None,
                         help="one diff per trait, in order (default: persona_loras/<model>/<trait>/<trait>_lora_diff.pt)")
    margins.add_argument("--levels", nargs="+", type=float, default=[0.0, 2.0])
    add_generation_args(margins)  # of the reference answers; --n_per_question: per question and side
    summary = commands.add_parser("summarize")
    summary.add_argument("--output_dir", required=True)
    summary.add_argument("--traits", nargs="+", required=True, help="the composed traits, each judged on its own questions")
    summary.add_argument("--model", default=None, help="for the default diff and vector paths of the similarity panels")
    summary.add_argument("--layer", type=int, default=None, help="activation-space similarity layer (default: two thirds of the depth)")
    args = parser.parse_args()
    if args.command in ("grid", "likelihood") and len(set(args.levels)) < 2:
        parser.error(f"{args.command} needs at least two distinct --levels")
    if args.command == "grid" and args.n_diffs < 1:
        parser.error("grid needs --n_diffs ≥ 1")
    {"grid": print_grid, "likelihood": likelihood, "summarize": summarize}[args.command](args)


if __name__ == "__main__":
    run_cli(main)
