"""Stage 1: contrastive responses → pos/neg LoRA adapters → the exact persona diff, and the
activation persona vector from the same responses.

    python extract_persona_lora.py --trait evil --output_dir persona_loras/SmolLM2-135M-Instruct/evil

Each extraction question is answered under each of the trait's pos (neg) system prompts, after
--fewshot K demonstrations of the behaviour as earlier chat turns. The adapters are trained on
question → answer alone, without prompt or demonstrations, so the diff distils the elicited
behaviour into weights.

Writes, under --output_dir:
    data/pos.jsonl, data/neg.jsonl   responses under the trait's pos/neg prompts (reused on rerun)
    judge_data/pos.jsonl, neg.jsonl  the offline judge's own data: answers to the trait's judge
                                     questions, which no other stage trains on or measures (unless
                                     --judge_data names another extraction's)
    pos_lora/, neg_lora/             PEFT adapters trained on question → response
    <trait>_lora_diff.pt (+ .safetensors)   ΔW = s_p·B_p·A_p − s_n·B_n·A_n, as factors
    <trait>_lora_diff_peft/          the diff as a standard PEFT adapter at coefficient 1
    summary.json, manifest.json      losses, ΔW's norms and spectra, how separable pos and neg are
and persona_vectors/<model>/<trait>_response_avg_diff.pt, a tensor [L+1, hidden].

From a public A/B set instead of prompted answers (Contrastive Activation Addition's way):

    python extract_persona_lora.py --trait sycophancy \
        --ab_source dataset/external/caa/generate/sycophancy/generate_dataset.json --output_dir D

splits the file's items, seeded, into extraction and held-out evaluation items; pos_lora learns
question → matching answer, neg_lora question → non-matching answer (the letter with its choice's
text, letters balanced), and the vector is the mean residual stream at the answer's letter token,
matching minus non-matching (eval/ab_source.py). Instead of data/ and judge_data/ it writes
ab_extraction.jsonl (the items trained on, as trained on) and ab_evaluation.jsonl (the held-out
items, for `eval_lora_persona.py --ab_data D/ab_evaluation.jsonl`); the manifest and the summary
record the file's hash and the split. --trait may then also name a behaviour outside dataset/.
"""

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

import lora_utils as lu
from eval.ab_source import ab_records, answer_letter_vector, balance_letters, load_ab_source, measured_items, split_ab_items
from eval.activations import load_vector, persona_vector, response_hidden_means
from eval.elicitation import SIDES, check_fewshot, pool_size, prompted_jobs
from eval.generation import GenerationSettings, cached_generation, read_chat_jsonl, stream_seed
from eval.judge import DEFAULT_OPENAI_JUDGE, make_judge
from eval.judge_data import write_judge_data
from eval.offline_judge import auroc
from eval.traits import available_traits, load_trait, measured_questions
from io_utils import ArgumentParser, OutputLock, PersonaLoRAError, atomic_path, check_writable, check_writable_dir, file_identity
from io_utils import non_negative_int, positive_float, positive_int, read_json_object, remove_stale_temporaries, run_cli
from io_utils import unit_interval, write_json, write_jsonl, write_manifest
from model_loading import check_dtype, check_model_source, default_persona_paths, is_embedded, load_model_and_tokenizer
from model_loading import model_label
from trainer import DEFAULT_TARGETS, finished_adapter, init_seed, records_digest, train_lora_adapter

# A small, fast profile for the embedded 135M model on CPU; the seed's settings for 8B-class models.
# The small profile elicits with 4 demonstrations: with the system prompt alone the 135M model's
# pos and neg answers hardly differ for most traits (README: "Few-shot elicitation").
PROFILES = {
    "small": dict(n_per_question=1, max_new_tokens=64, temperature=0.7, top_p=0.9, rank=8, alpha=16, use_rslora=False,
                  epochs=2, learning_rate=5e-4, batch_size=8, max_length=256, gen_batch_size=64, fewshot=4),
    "full": dict(n_per_question=2, max_new_tokens=384, temperature=1.0, top_p=1.0, rank=32, alpha=64, use_rslora=True,
                 epochs=2, learning_rate=1e-4, batch_size=16, max_length=1024, gen_batch_size=64, fewshot=0),
}
AB_MAX_LENGTH = 512  # --ab_source: a public item's question with its choices runs to ~270 tokens on SmolLM2's tokenizer


def parse_args():
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="hub id or local folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--trait", required=True, help="a folder of dataset/ (evil, sycophancy, hallucination, corrigibility, ...)")
    parser.add_argument("--output_dir", default=None, help="default: persona_loras/<model>/<trait>")
    parser.add_argument("--profile", choices=["auto", "small", "full"], default="auto",
                        help="defaults for the flags below: small for the embedded model, full otherwise")
    generation = parser.add_argument_group("contrastive data")
    generation.add_argument("--n_per_question", type=positive_int)
    generation.add_argument("--max_new_tokens", type=positive_int)
    generation.add_argument("--temperature", type=positive_float)
    generation.add_argument("--top_p", type=unit_interval)
    generation.add_argument("--gen_batch_size", type=positive_int)
    generation.add_argument("--fewshot", type=non_negative_int,
                            help="demonstrations before each question, from the trait's 'demonstrations' (small profile 4, full 0)")
    generation.add_argument("--pos_data", help="train from your own chat JSONL instead of generating (needs --neg_data)")
    generation.add_argument("--neg_data", help="chat JSONL of the opposite behaviour (needs --pos_data)")
    training = parser.add_argument_group("LoRA training")
    training.add_argument("--rank", type=positive_int)
    training.add_argument("--alpha", type=positive_float)
    training.add_argument("--use_rslora", action=argparse.BooleanOptionalAction, default=None)
    training.add_argument("--target_modules", nargs="+", default=DEFAULT_TARGETS)
    training.add_argument("--epochs", type=positive_int)
    training.add_argument("--learning_rate", type=positive_float)
    training.add_argument("--batch_size", type=positive_int)
    training.add_argument("--max_length", type=positive_int)
    training.add_argument("--skip_training", action="store_true", help="rebuild the diff from existing pos_lora/ and neg_lora/")
    judging = parser.add_argument_group("the offline judge's data and the judge filter (Persona Vectors' filter)")
    judging.add_argument("--judge_data", default=None,
                         help="the offline judge's data folder to use instead of generating <output_dir>/judge_data "
                              "(e.g. another extraction's, to compare extraction settings under one judge)")
    judging.add_argument("--filter_threshold", type=float, default=None,
                         help="keep pos responses whose trait score is ≥ this and neg responses below it")
    judging.add_argument("--judge", default=None, help="openai | hf:<model> | offline (default: openai if OPENAI_API_KEY is set)")
    judging.add_argument("--judge_model", default=DEFAULT_OPENAI_JUDGE)
    public = parser.add_argument_group("a public A/B set as the source, instead of prompted answers")
    public.add_argument("--ab_source", default=None,
                        help="an A/B file in the public format (e.g. dataset/external/caa/generate/sycophancy/generate_dataset.json), "
                             "or 'public' for the one the trait links (dataset/<trait>/public_ab.json): pos/neg adapters on its "
                             "matching/non-matching answers, the vector at the answer letter")
    public.add_argument("--ab_eval_fraction", type=unit_interval, default=0.25,
                        help="the share of the file's questions held out for evaluation (written to ab_evaluation.jsonl)")
    public.add_argument("--ab_split_seed", type=non_negative_int, default=0,
                        help="the split's seed (apart from --seed, so replicates share their held-out items)")
    public.add_argument("--ab_max_items", type=positive_int, default=None,
                        help="train on the first N extraction items of the split only (the evaluation items stay the same)")
    parser.add_argument("--vector_output_path", default=None,
                        help="default: persona_vectors/<model>/<trait>_response_avg_diff.pt")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, float32 on CPU), float32, bfloat16")
    args = parser.parse_args()

    if args.ab_source and (args.pos_data or args.fewshot is not None or args.judge_data or args.filter_threshold is not None):
        parser.error("--ab_source trains on the file's own answers: it does not go with --pos_data/--neg_data, --fewshot, "
                     "--judge_data or --filter_threshold")
    if args.ab_source and args.max_length is None:
        args.max_length = AB_MAX_LENGTH
    if (args.pos_data is None) != (args.neg_data is None):
        parser.error("--pos_data and --neg_data go together")
    if args.filter_threshold is not None and args.pos_data:
        parser.error("--filter_threshold needs the trait's rubric: use it with generated data, not --pos_data")
    if args.filter_threshold is not None and not 0 <= args.filter_threshold <= 100:
        parser.error(f"--filter_threshold {args.filter_threshold} is not a score between 0 and 100")
    profile = args.profile if args.profile != "auto" else ("small" if is_embedded(args.model) else "full")
    for key, value in PROFILES[profile].items():
        if getattr(args, key) is None and key != "fewshot":  # fewshot: capped by the trait's demonstrations (check_inputs)
            setattr(args, key, value)
    args.profile = profile
    diff_path, vector_path = default_persona_paths(args.model, args.trait)
    args.output_dir = args.output_dir or str(diff_path.parent)
    args.vector_output_path = args.vector_output_path or str(vector_path)
    return args


def check_inputs(args):
    """Everything that can be refused, before the model loads. Returns the trait (None for a name
    outside dataset/ with --pos_data)."""
    check_model_source(args.model)
    check_dtype(args.dtype)
    trait = None
    if args.ab_source:
        trait = load_trait(args.trait) if args.trait in available_traits() else None
        args.fewshot = 0
    elif args.pos_data:
        read_chat_jsonl(args.pos_data), read_chat_jsonl(args.neg_data)
        args.fewshot = 0
        trait = load_trait(args.trait) if args.trait in available_traits() else None
    else:
        trait = load_trait(args.trait)  # an unknown name lists the available ones
        if args.fewshot is None:
            args.fewshot = min(PROFILES[args.profile]["fewshot"], pool_size(trait))
        check_fewshot(trait, args.fewshot)
    if args.judge_data and not ((Path(args.judge_data) / "pos.jsonl").is_file() and (Path(args.judge_data) / "neg.jsonl").is_file()):
        raise PersonaLoRAError(f"--judge_data {args.judge_data} holds no pos.jsonl and neg.jsonl (an extraction's judge_data folder)")
    check_same_source(args)
    check_writable_dir(args.output_dir, "--output_dir")
    check_writable(args.vector_output_path, "--vector_output_path")
    return trait


def extraction_source(args) -> dict:
    """What the outputs were made from, as summary.json records it: prompted answers, or an A/B file."""
    if not args.ab_source:
        return {"kind": "prompts"}
    return {"kind": "ab", "ab_source": file_identity(args.ab_source)}


def previous_summary(output_dir) -> dict | None:
    """An earlier extraction's summary.json in output_dir, or None (also when unreadable: it then
    records nothing to protect)."""
    path = Path(output_dir) / "summary.json"
    try:
        return read_json_object(path, "extraction summary") if path.is_file() else None
    except PersonaLoRAError:
        return None


def source_kind(summary: dict) -> str:
    return (summary.get("source") or {"kind": "prompts"})["kind"]  # summaries before --ab_source record none


def check_same_source(args) -> None:
    """Refuse to write an A/B-derived persona over a prompt-derived one (or the reverse): both
    sources of one trait are meant to sit side by side, in two folders, with two vectors."""
    kind = extraction_source(args)["kind"]
    previous = previous_summary(args.output_dir)
    if previous is not None and source_kind(previous) != kind:
        made = "prompted answers" if kind == "ab" else "an A/B file"
        raise PersonaLoRAError(f"--output_dir {args.output_dir} holds a persona extracted from {made}; give the "
                               f"{'--ab_source' if kind == 'ab' else 'prompt-derived'} extraction its own --output_dir "
                               "(and --vector_output_path)")
    prompted = previous_summary(default_persona_paths(args.model, args.trait)[0].parent)
    prompted_vector = ((prompted or {}).get("activation_vector") or {}).get("path")
    if (kind == "ab" and prompted is not None and source_kind(prompted) == "prompts" and prompted_vector
            and Path(prompted_vector).resolve() == Path(args.vector_output_path).resolve()):
        raise PersonaLoRAError(f"--vector_output_path {args.vector_output_path} is the prompt-derived vector of '{args.trait}'; "
                               "give the --ab_source extraction its own --vector_output_path")


def ab_source_plan(args) -> dict:
    """The A/B file's items, the seeded split and the letter-balanced extraction items, checked
    before the model loads: no question on both sides, none that a trait of dataset/ measures."""
    if args.ab_source == "public":
        trait = load_trait(args.trait) if args.trait in available_traits() else None
        if trait is None or trait.public_ab is None:
            raise PersonaLoRAError(f"--ab_source public: '{args.trait}' links no public A/B set (dataset/{args.trait}/public_ab.json); "
                                   "give the A/B file's path")
        args.ab_source = str(trait.public_ab)
    items = load_ab_source(args.ab_source)
    split = split_ab_items(items, args.ab_eval_fraction, args.ab_split_seed)
    used = split.extraction[:args.ab_max_items] if args.ab_max_items else split.extraction
    for index, where in measured_items(items, used, measured_questions())[:1]:
        raise PersonaLoRAError(f"--ab_source {args.ab_source}: item {index} is one of {where}; "
                               "a persona must not train on a question that measures it (remove the item from the file)")
    extraction, letters = balance_letters([items[i] for i in used], args.ab_split_seed)
    return {"items": items, "split": split, "extraction": extraction, "letter_balance": letters,
            "evaluation": [items[i] for i in split.evaluation]}


def public_format(item) -> dict:
    """An item as the public A/B format writes it, with its index in the source file."""
    not_matching = item.not_matching[0] if len(item.not_matching) == 1 else list(item.not_matching)
    return {"question": item.question, "answer_matching_behavior": item.matching, "answer_not_matching_behavior": not_matching,
            "source_index": item.index}


def write_ab_split(plan: dict, output_dir: Path) -> dict:
    """ab_extraction.jsonl (the items as trained on: some with their choices swapped for the letter
    balance) and ab_evaluation.jsonl (the held-out items, unchanged), for eval_lora_persona.py --ab_data."""
    files = {}
    for stage in ("extraction", "evaluation"):
        path = output_dir / f"ab_{stage}.jsonl"
        write_jsonl(path, [public_format(item) for item in plan[stage]])
        files[stage] = file_identity(path)
    return files


def contrastive_jobs(trait, n_per_question: int, fewshot: int) -> dict[str, list[dict]]:
    """Every extraction question under every pos (resp. neg) instruction, n_per_question times."""
    return {side: prompted_jobs(trait, trait.extraction_questions, side, n_per_question=n_per_question, fewshot=fewshot,
                                stage="extraction", every_instruction=True) for side in SIDES}


def contrastive_data(args, trait, model, tokenizer, data_dir: Path) -> dict[str, list[dict]]:
    """Generate the pos/neg responses, or reuse them if a run with the same settings made them."""
    if args.pos_data:
        return {"pos": read_chat_jsonl(args.pos_data), "neg": read_chat_jsonl(args.neg_data)}
    settings = GenerationSettings.from_flags(args)
    trait_file = hashlib.sha256(trait.path.read_bytes()).hexdigest()
    return {side: cached_generation(model, tokenizer, jobs, data_dir / f"{side}.jsonl", settings,
                                    seed=stream_seed(f"extraction_{side}", args.seed), desc=f"generating {side}",
                                    trait_file_sha256=trait_file, fewshot=args.fewshot)
            for side, jobs in contrastive_jobs(trait, args.n_per_question, args.fewshot).items()}


def judged_scores(judge, records: list[dict], desc: str) -> list:
    return judge.score("trait", [r["messages"][-2]["content"] for r in records], [r["messages"][-1]["content"] for r in records],
                       desc=desc)


def filter_by_judge(args, judge, data: dict[str, list[dict]]) -> tuple[dict[str, list[dict]], dict]:
    """Keep pos responses that the judge scores ≥ threshold and neg responses below it."""
    kept, report = {}, {"threshold": args.filter_threshold, "judge": judge.name}
    for side, records in data.items():
        scores = judged_scores(judge, records, f"judging {side}")
        keep = [s is not None and s == s and (s >= args.filter_threshold if side == "pos" else s < args.filter_threshold)
                for s in scores]
        kept[side] = [r for r, k in zip(records, keep) if k]
        report[side] = {"kept": len(kept[side]), "of": len(records)}
        if not kept[side]:
            raise PersonaLoRAError(f"--filter_threshold {args.filter_threshold} keeps no {side} response; choose another threshold")
    print(f"judge filter at {args.filter_threshold}: kept pos {report['pos']['kept']}/{report['pos']['of']}, "
          f"neg {report['neg']['kept']}/{report['neg']['of']}")
    return kept, report


def separability(judge, data: dict[str, list[dict]]) -> dict:
    """How separable the extraction's pos and neg answers are, by a classifier that never saw them
    nor their questions (the offline judge, fit on the judge questions): its AUROC, pos vs neg."""
    scores = {side: judged_scores(judge, data[side], f"separability ({side})") for side in SIDES}
    values = [s for side in SIDES for s in scores[side]]
    labels = [1] * len(scores["pos"]) + [0] * len(scores["neg"])
    pairs = [(v, y) for v, y in zip(values, labels) if v is not None and v == v]
    report = judge.report()
    return {"judge_auroc_pos_vs_neg": auroc([v for v, _ in pairs], [y for _, y in pairs]), "judge": judge.name,
            "judge_description": report["description"], "judge_quality": report["quality"],
            "mean_pos": sum(v for v, y in pairs if y) / max(1, sum(labels)),
            "mean_neg": sum(v for v, y in pairs if not y) / max(1, len(labels) - sum(labels)),
            "note": "the offline judge's classifier was fit on answers to the judge questions, disjoint from the extraction's"
                    if judge.name.startswith("offline") else "an LLM judge, fit on no data here"}


def activation_vector(args, model, tokenizer, data, summary_path: Path) -> tuple[torch.Tensor, str]:
    """The activation direction from the very same responses (Persona Vectors: read after the
    prompt that elicited them, averaged over answer tokens; with --ab_source CAA's, at the answer's
    letter token). Reused when the previous run's summary
    says it came from the same responses, model and settings, and the file is still there."""
    tokens = "answer_letter" if args.ab_source else "answer"
    identity = hashlib.sha256(json.dumps({"data": data, "model": args.model, "dtype": str(model.dtype), "tokens": tokens},
                                         sort_keys=True).encode()).hexdigest()
    if summary_path.is_file() and Path(args.vector_output_path).is_file():
        try:
            previous = read_json_object(summary_path, "extraction summary").get("activation_vector")
        except PersonaLoRAError:
            previous = None  # an unreadable summary proves nothing: compute the vector again
        if previous == {"path": str(args.vector_output_path), "identity": identity}:
            print(f"reusing {args.vector_output_path} (computed from the same responses)")
            return load_vector(args.vector_output_path), identity
    if args.ab_source:
        vector = answer_letter_vector(model, tokenizer, data)
    else:
        # Not truncated to the training length: the demonstrations before an answer can be longer than that.
        means = {side: response_hidden_means(model, tokenizer, data[side], with_context=True, desc=f"{side} hidden states")
                 for side in SIDES}
        vector = persona_vector(means["pos"], means["neg"])
    with atomic_path(args.vector_output_path) as tmp:
        torch.save(vector, tmp)
    return vector, identity


def persona_init_stream(args) -> str:
    """The pos and neg adapters' shared initialisation stream: one per trait and source, so that two
    diffs compared with each other do not share a row space (their cosine, their cross-talk when
    merged together and their data-weighted agreement would then be about the shared start, not the
    traits): a trait's prompt-derived and A/B-derived diffs are compared in scripts/cross_source.py."""
    return f"persona:{args.trait}" + (":ab" if args.ab_source else "")


def persona_init_seed(args) -> int:
    return init_seed(persona_init_stream(args), args.seed)


def train_side(args, model, tokenizer, records, adapter_dir: Path, side: str) -> dict:
    settings = dict(rank=args.rank, alpha=args.alpha, use_rslora=args.use_rslora, target_modules=args.target_modules,
                    epochs=args.epochs, learning_rate=args.learning_rate, batch_size=args.batch_size,
                    max_length=args.max_length, seed=args.seed)
    identity = {"examples_sha256": records_digest(records),
                "init_seed": persona_init_seed(args)}
    previous = finished_adapter(adapter_dir)
    if args.skip_training:
        if previous is None:
            raise PersonaLoRAError(f"--skip_training: no finished adapter in {adapter_dir}; run without --skip_training first")
        return previous
    if previous is not None and all(previous.get(k) == v for k, v in {**settings, **identity}.items()):
        print(f"reusing {adapter_dir} (trained on the same data with the same settings)")
        return previous
    # pos and neg start from one initialisation (the trait's persona stream of --seed), so their
    # difference isolates what the data taught; finetunes draw theirs from another stream.
    return train_lora_adapter(model, tokenizer, records, adapter_dir, adapter_init_seed=identity["init_seed"],
                              base_model_name=model_label(args.model), desc=f"training {side}_lora",
                              record_extra={"examples_sha256": identity["examples_sha256"]}, **settings)


def made_by_record(manifest_path: Path) -> dict | None:
    """The record of the run that made a diff a rerun keeps: the earlier manifest's own record (or
    the one it carried), so reusing an extraction does not erase how long it took and how it ran."""
    try:
        previous = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return None
    if previous.get("made_by"):
        return previous["made_by"]
    return {key: previous.get(key) for key in ("command", "versions", "machine", "started", "seconds", "stages", "timings")}


def same_diff_saved(diff, diff_path: Path, peft_dir: Path) -> bool:
    """Whether diff_path (and its twin and PEFT export) already hold this diff: the same factors and
    the same metadata but for the time it was created."""
    if not (diff_path.is_file() and diff_path.with_suffix(".safetensors").is_file() and (peft_dir / "adapter_config.json").is_file()):
        return False
    try:
        saved = lu.load_lora_diff(diff_path)
    except PersonaLoRAError:
        return False  # unreadable: overwrite it

    def described(metadata):  # less what differs between two savings of one diff, or is added on loading
        return json.loads(json.dumps({k: v for k, v in metadata.items() if k not in ("created", "source_path")}, default=str))

    return (described(saved.metadata) == described(diff.metadata) and set(saved.factors) == set(diff.factors)
            and all(torch.equal(saved.factors[n][i], diff.factors[n][i]) for n in diff.factors for i in (0, 1)))


def print_summary(args, data, trainings, diff, vector) -> dict:
    layer_norms = diff.layer_norms()
    top = {}
    for kind in sorted({lu.module_type(n) for n in diff}):
        name = max((n for n in diff if lu.module_type(n) == kind), key=diff.module_sq_norm)
        top[kind] = {"module": name, "singular_values": [round(float(s), 5) for s in diff.singular_values(name)[:5]]}
    summary = {
        "trait": args.trait, "model": model_label(args.model), "fewshot": None if args.pos_data or args.ab_source else args.fewshot,
        "examples": {side: len(records) for side, records in data.items()},
        "final_epoch_loss": {side: t["epoch_losses"][-1] for side, t in trainings.items()},
        "epoch_losses": {side: t["epoch_losses"] for side, t in trainings.items()},
        "diff_norm": diff.norm(), "layer_norms": layer_norms, "top_singular_values": top,
        "vector_norm_by_layer": [round(float(x), 4) for x in vector.norm(dim=1)],
    }
    print(f"\n== persona LoRA for '{args.trait}' on {summary['model']} ==")
    print(f"examples: pos {summary['examples']['pos']}, neg {summary['examples']['neg']}"
          + ("" if args.pos_data or args.ab_source else f" ({args.fewshot} demonstrations before each question)"))
    for side, t in trainings.items():
        print(f"{side}_lora loss by epoch: " + " → ".join(f"{x:.3f}" for x in t["epoch_losses"]))
    print(f"‖ΔW‖_F = {diff.norm():.4f}; by layer:")
    peak = max(layer_norms.values())
    for layer, value in layer_norms.items():
        print(f"  layer {layer:3d}  {value:8.4f}  {'█' * max(1, round(30 * value / peak))}")
    print("top singular values of the largest module of each type:")
    for kind, entry in top.items():
        print(f"  {kind:10s} {', '.join(f'{s:.4f}' for s in entry['singular_values'])}")
    best = int(vector[1:].norm(dim=1).argmax()) + 1
    print(f"activation vector {tuple(vector.shape)}; largest ‖v[ℓ]‖ at ℓ={best} ({vector[best].norm():.3f})")
    return summary


def main():
    args = parse_args()
    started = time.time()
    plan = ab_source_plan(args) if args.ab_source else None
    trait = check_inputs(args)
    if plan is not None and trait is None:
        print(f"note: '{args.trait}' is not a trait of dataset/: it has no judged evaluation questions, only the held-out "
              f"items of {args.ab_source} (ab_evaluation.jsonl)")
    output_dir = Path(args.output_dir)
    with OutputLock(output_dir, "--output_dir"):
        remove_stale_temporaries(output_dir)
        model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype)
        if plan is not None:
            source = {**extraction_source(args), "items": len(plan["items"]), "split": plan["split"].as_record(len(plan["extraction"])),
                      "letter_balance": plan["letter_balance"], "files": write_ab_split(plan, output_dir),
                      "answers": "the item's letter and its choice's text", "vector_position": "the answer's letter token"}
            data = ab_records(plan["extraction"])
        else:
            source = extraction_source(args)
            data = contrastive_data(args, trait, model, tokenizer, output_dir / "data")
        judge_data_dir = Path(args.judge_data) if args.judge_data else output_dir / "judge_data"
        if trait is not None and not args.judge_data and plan is None:
            write_judge_data(model, tokenizer, trait, judge_data_dir, GenerationSettings.from_flags(args))
        judge = None
        if plan is None and trait is not None and (args.filter_threshold is not None or (judge_data_dir / "pos.jsonl").is_file()):
            judge = make_judge(args.judge, trait, args.judge_model, judge_data=str(judge_data_dir))
        filter_report, separation = None, None
        if judge is not None and not args.pos_data:
            separation = separability(judge, data)
        if args.filter_threshold is not None:
            print("warning: the judge that filters the persona's training data is the one that will judge its evaluations "
                  "(by default): its preferences shape the persona; judge the evaluations with another judge", file=sys.stderr)
            data, filter_report = filter_by_judge(args, judge, data)

        vector, vector_identity = activation_vector(args, model, tokenizer, data, output_dir / "summary.json")

        trainings = {side: train_side(args, model, tokenizer, data[side], output_dir / f"{side}_lora", side) for side in SIDES}
        diff = lu.compute_persona_lora_diff(output_dir / "pos_lora", output_dir / "neg_lora", trait=args.trait)
        diff.metadata.update(base_model=model_label(args.model), created_by="extract_persona_lora.py", seed=args.seed,
                             profile=args.profile, fewshot=None if args.pos_data or args.ab_source else args.fewshot,
                             activation_vector=str(args.vector_output_path),
                             init={"seed": persona_init_seed(args), "rank": args.rank,
                                   "target_modules": sorted(args.target_modules), "stream": persona_init_stream(args)})
        if args.ab_source:  # only then: new metadata on a prompt-derived diff would rewrite it and void its cached evaluations
            diff.metadata["source"] = extraction_source(args)
        diff_path = output_dir / f"{args.trait}_lora_diff.pt"
        made_by = None  # the run that made the kept diff, when this one only reuses it
        if same_diff_saved(diff, diff_path, output_dir / f"{args.trait}_lora_diff_peft"):
            # Rewriting would only change its "created" stamp, and with it the file's hash that keys
            # every cached evaluation of this diff: keep the file, so reruns of the drivers reuse them.
            print(f"{diff_path} is unchanged (same adapters): kept")
            made_by = made_by_record(output_dir / "manifest.json")
        else:
            diff.save(diff_path)
            diff.to_peft_adapter(output_dir / f"{args.trait}_lora_diff_peft", coefficient=1.0)

        summary = print_summary(args, data, trainings, diff, vector)
        summary.update(source=source, judge_filter=filter_report, separability=separation,
                       activation_vector={"path": str(args.vector_output_path), "identity": vector_identity})
        if separation:
            print(f"pos vs neg separability (offline judge fit on the judge questions): AUROC {separation['judge_auroc_pos_vs_neg']:.3f}")
        write_json(output_dir / "summary.json", summary)
        write_manifest(output_dir, args, started, outputs={"diff": str(diff_path), "vector": args.vector_output_path},
                       sizes={"diff_bytes": diff_path.stat().st_size, "examples": summary["examples"]},
                       timings={side: t.get("seconds") for side, t in trainings.items()}, source=source,
                       **({"made_by": made_by} if made_by else {}))
    if plan is not None:
        letters = plan["letter_balance"]["after"]
        print(f"A/B source: {len(plan['extraction'])} extraction items (matching answer first in {letters['matching_first']}, "
              f"second in {letters['matching_second']}), {len(plan['evaluation'])} held out in {output_dir / 'ab_evaluation.jsonl'}")
    print(f"\nwrote {diff_path} and {args.vector_output_path} in {time.time() - started:.0f} s")


if __name__ == "__main__":
    run_cli(main)
