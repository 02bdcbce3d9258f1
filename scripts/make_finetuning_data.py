"""Finetuning data for Experiments 2 and 3, generated fresh on the trait's finetuning questions
(disjoint from the extraction, evaluation and judge questions) with their own sampling seeds, so
no finetune is trained on an answer that trained the persona adapters or that measures anything.

    python scripts/make_finetuning_data.py --trait evil --fewshot 4 --n_per_question 4
    python scripts/make_finetuning_data.py --trait evil --sides plain      # unprompted answers: benign data

Writes --output_dir (default persona_loras/<model>/<trait>/finetune_data)/<side>.jsonl for each of
--sides: pos and neg are answers under the trait's pos / neg system prompts (rotating over the
instructions) after --fewshot demonstrations; plain is the model's own answer with no prompt.
Reused on rerun (resumable); a rerun with other settings is refused.
"""

import hashlib


from eval.elicitation import check_fewshot, prompted_jobs
from eval.generation import GenerationSettings, answers_identity, cached_generation, reusable_answers, stream_seed
from eval.traits import load_trait
from io_utils import (
    ArgumentParser,
    OutputLock,
    check_writable_dir,
    non_negative_int,
    positive_float,
    positive_int,
    run_cli,
    unit_interval,
)
from model_loading import check_dtype, check_model_source, load_model_and_tokenizer, persona_dir, resolve_dtype


def jobs_for(trait, side: str, n_per_question: int, fewshot: int) -> list[dict]:
    if side in ("pos", "neg"):
        return prompted_jobs(trait, trait.finetuning_questions, side, n_per_question=n_per_question, fewshot=fewshot,
                             stage="finetuning", every_instruction=False)
    return [{"id": f"finetuning-plain-q{index}-s{sample}", "side": "plain", "question_id": f"{trait.name}_finetuning_{index}",
             "system": None, "messages": [{"role": "user", "content": question}]}
            for index, question in enumerate(trait.finetuning_questions) for sample in range(n_per_question)]


def main():
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--trait", required=True)
    parser.add_argument("--model", default=None)
    parser.add_argument("--output_dir", default=None, help="default: persona_loras/<model>/<trait>/finetune_data")
    parser.add_argument("--sides", nargs="+", choices=["pos", "neg", "plain"], default=["pos", "neg"])
    parser.add_argument("--n_per_question", type=positive_int, default=4)
    parser.add_argument("--fewshot", type=non_negative_int, default=4, help="demonstrations before each question (pos/neg)")
    parser.add_argument("--max_new_tokens", type=positive_int, default=None, help="default 64 embedded, 600 otherwise")
    parser.add_argument("--temperature", type=positive_float, default=None)
    parser.add_argument("--top_p", type=unit_interval, default=0.9)
    parser.add_argument("--batch_size", type=positive_int, default=64)
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    check_model_source(args.model)
    check_dtype(args.dtype)
    trait = load_trait(args.trait)
    check_fewshot(trait, args.fewshot)
    output_dir = check_writable_dir(args.output_dir or persona_dir(args.model, args.trait) / "finetune_data", "--output_dir")
    settings = GenerationSettings.for_model(args.model, args.n_per_question, args.max_new_tokens, args.temperature, top_p=args.top_p,
                                            batch_size=args.batch_size, seed=args.seed, dtype=args.dtype)
    trait_file = hashlib.sha256(trait.path.read_bytes()).hexdigest()
    what = {side: {"trait_file_sha256": trait_file, "fewshot": 0 if side == "plain" else args.fewshot} for side in args.sides}
    jobs = {side: jobs_for(trait, side, args.n_per_question, args.fewshot) for side in args.sides}
    seeds = {side: stream_seed(f"finetuning_{side}", args.seed) for side in args.sides}
    with OutputLock(output_dir, "--output_dir"):
        # Checked before the model loads: a rerun that finds every side made costs nothing.
        todo = [side for side in args.sides if reusable_answers(
            output_dir / f"{side}.jsonl", answers_identity(settings, resolve_dtype(args.dtype), seeds[side], **what[side]), jobs[side]) is None]
        model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype) if todo else (None, None)
        for side in args.sides:
            path = output_dir / f"{side}.jsonl"
            if side not in todo:
                print(f"reusing {path} ({len(jobs[side])} answers)")
                continue
            records = cached_generation(model, tokenizer, jobs[side], path, settings, seed=seeds[side],
                                        desc=f"finetuning data ({side})", **what[side])
            print(f"wrote {path} ({len(records)} answers to {len(trait.finetuning_questions)} finetuning questions)")


if __name__ == "__main__":
    run_cli(main)
