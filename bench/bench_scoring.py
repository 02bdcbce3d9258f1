"""Teacher-forced scoring (the A/B choices and the judge-free margin), before and after keeping
only the answer positions' logits and packing the answers to one prompt into one row.

    python bench/bench_scoring.py [--model M] [--trait evil] [--repeats 3] [--threads N] [--output F.json]

One model load, one process. The trait's A/B items (both orders, both answers: what
eval.ab.score_ab_items scores under every condition) and 110 real answers of the embedded model
with their questions (tests/data/evil_smollm2_pos.jsonl: what the margin scores, question →
answer) are scored by the former path (a verbatim copy: every position's vocabulary-wide logits,
input order) and by eval.generation.answer_token_log_probs (answers to one prompt packed into one
row, the prompt read once; rows sorted by length; logits only where an answer token is predicted:
an A/B item's two answers share each order's prompt, and the file's 110 answers are 5 to each of
22 questions, where the demo's margin scores 4: 2 pos and 2 neg references), alternating, the
fastest of --repeats counting. Prints and (with --output) writes the speed-ups and the largest difference between the paths' log-probabilities.
"""

import argparse
import time
from pathlib import Path

import torch

from eval.ab import continuation_span, load_ab_items, reply_prompt
from eval.activations import teacher_forced_response
from eval.generation import answer_token_log_probs, pad_right, tokenize_chat
from io_utils import read_jsonl, write_json
from model_loading import load_model_and_tokenizer, model_device, model_label

ROOT = Path(__file__).resolve().parent.parent


@torch.no_grad()
def former_scores(model, pad_id, spans, batch_size):
    """The former continuation_log_probs / response_log_likelihoods loop, verbatim but returning
    each answer token's log-probability: full logits at every position, batches in input order."""
    results = []
    device = model_device(model)
    for start in range(0, len(spans), batch_size):
        chunk = spans[start:start + batch_size]
        input_ids, attention_mask = pad_right([ids for ids, _, _ in chunk], pad_id)
        with teacher_forced_response(torch.tensor([answer_start for _, answer_start, _ in chunk])):
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        for row, (_, answer_start, answer_end) in enumerate(chunk):
            predicted = logits[row, answer_start - 1:answer_end - 1].float().log_softmax(-1)
            targets = input_ids[row, answer_start:answer_end].to(predicted.device)
            results.append(predicted.gather(1, targets[:, None])[:, 0].cpu())
    return results


def compare(name, model, pad_id, spans, batch_size, repeats):
    old_seconds = new_seconds = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        old = former_scores(model, pad_id, spans, batch_size)
        old_seconds = min(old_seconds, time.perf_counter() - started)
        started = time.perf_counter()
        new = answer_token_log_probs(model, pad_id, spans, batch_size)
        new_seconds = min(new_seconds, time.perf_counter() - started)
    difference = max(float((a - b).abs().max()) for a, b in zip(old, new))
    tokens = sum(len(ids) for ids, _, _ in spans)
    print(f"{name}: {len(spans)} sequences, {tokens} tokens; former {old_seconds:.1f} s, packed, answer logits only "
          f"{new_seconds:.1f} s ({old_seconds / new_seconds:.2f}x); largest difference {difference:.1e}", flush=True)
    return {"sequences": len(spans), "tokens": tokens, "batch_size": batch_size, "former_seconds": round(old_seconds, 2),
            "new_seconds": round(new_seconds, 2), "speedup": round(old_seconds / new_seconds, 3), "max_abs_difference": difference}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--trait", default="evil")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer(args.model, dtype="float32")
    ab_spans = []
    for item in load_ab_items(ROOT / "dataset" / args.trait / "ab.jsonl"):
        for variant in (item, item.swapped):
            if variant is None:
                continue
            prompt = reply_prompt(tokenizer, variant.question, None)
            for answer in variant.answers:
                ids, start = continuation_span(tokenizer, prompt, answer)
                ab_spans.append((ids, start, len(ids)))
    margin_spans = [tokenize_chat(tokenizer, [r["messages"][0], r["messages"][-1]])
                    for r in read_jsonl(ROOT / "tests" / "data" / "evil_smollm2_pos.jsonl")]
    margin_spans = [(s.ids, s.response_start, s.response_end) for s in margin_spans]
    print(f"{model_label(args.model)}, {torch.get_num_threads()} threads, fastest of {args.repeats}", flush=True)
    result = {"model": model_label(args.model), "threads": torch.get_num_threads(), "repeats": args.repeats,
              "ab": compare(f"A/B items of {args.trait} (both orders, both answers)", model, tokenizer.pad_token_id, ab_spans, 16,
                            args.repeats),
              "margin": compare("margin-style answers (question → answer)", model, tokenizer.pad_token_id, margin_spans, 8,
                                args.repeats)}
    if args.output:
        write_json(args.output, result)  # atomic, with its folder
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
