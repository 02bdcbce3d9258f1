"""Few-shot elicitation and the hidden-state pass, with and without shared-prefix reuse.

    python bench/bench_generation.py [--model M] [--trait evil] [--questions 10] [--fewshot 4]
                                     [--max_new_tokens 64] [--batch_size 64] [--repeats 1] [--threads N]
                                     [--output F.json]

One model load, one process. The extraction's jobs for --questions questions (every pos
instruction, K demonstrations each: what extract_persona_lora.py generates) are answered through
eval.generation.generate_records (its batches and seeds) four ways: zero-shot (the bare question)
and few-shot, each with the plain path (prefix_reuse(False): the code before reuse) and with reuse
(the default). Time per generated token is wall time over the answers' tokens. Then the few-shot
answers' response-averaged hidden states are computed by today's second pass (a verbatim copy of
the former span_hidden_means: every prompt + answer read whole) and by eval.activations'
(each shared prefix read once, the rest teacher-forced over its cache), and compared.

Printed and (--output) written as JSON: fewshot_over_zeroshot_per_token (few-shot with reuse over
zero-shot, both as the pipeline now runs them, per answer token), fewshot_over_zeroshot_time (the
same prompts' wall time: a batch decodes until its longest answer ends, so answers that stop
sooner are not cheaper), fewshot_over_zeroshot_per_token_without_reuse,
fewshot_reuse_speedup, hidden_state_speedup, and the largest differences between the paths.
On a 2-core CPU the defaults take a few minutes with the embedded model.
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

from eval.activations import response_hidden_means, teacher_forced_response
from eval.elicitation import prompted_jobs
from eval.generation import conversation, generate_records, pad_right, prefix_reuse, tokenize_chat
from eval.traits import load_trait
from io_utils import write_json
from model_loading import load_model_and_tokenizer, model_device, model_label


@torch.no_grad()
def second_pass_hidden_means(model, tokenizer, records, batch_size=16):
    """The former response_hidden_means/span_hidden_means, verbatim but for the progress bar:
    every record's whole prompt and answer in one right-padded forward pass."""
    spans = [tokenize_chat(tokenizer, conversation(r, True)) for r in records]
    means = []
    device = model_device(model)
    for start in range(0, len(spans), batch_size):
        chunk = []
        for ids, answer_start, answer_end in spans[start:start + batch_size]:
            answer_start = min(answer_start, len(ids) - 1)
            chunk.append((ids, answer_start, max(answer_end, answer_start + 1)))
        input_ids, attention_mask = pad_right([ids for ids, _, _ in chunk], tokenizer.pad_token_id)
        with teacher_forced_response(torch.tensor([answer_start for _, answer_start, _ in chunk])):
            output = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), output_hidden_states=True)
        response_mask = torch.zeros_like(attention_mask, dtype=torch.float32)
        for row, (_, answer_start, answer_end) in enumerate(chunk):
            response_mask[row, answer_start:answer_end] = 1.0
        weights = response_mask / response_mask.sum(1, keepdim=True)
        per_layer = [torch.einsum("bth,bt->bh", h.float(), weights.to(h.device)).cpu() for h in output.hidden_states]
        means.append(torch.stack(per_layer, dim=1))
    return torch.cat(means)


def timed(function):
    started = time.perf_counter()
    result = function()
    return result, time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--trait", default="evil")
    parser.add_argument("--questions", type=int, default=10, help="extraction questions (each under every pos instruction)")
    parser.add_argument("--fewshot", type=int, default=4)
    parser.add_argument("--max_new_tokens", type=int, default=64, help="as the small extraction profile")
    parser.add_argument("--batch_size", type=int, default=64, help="generation batch (as extraction's)")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top_p", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden_batch_size", type=int, default=16, help="the hidden-state pass's batch (as extraction's)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run the four generations (interleaved) and the two hidden-state passes this many times; "
                             "the fastest of each counts (on a shared machine, other load only slows a run down)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--output", default=None, help="write the ratios as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_model_and_tokenizer(args.model, dtype="float32")
    trait = load_trait(args.trait)
    fewshot_jobs = prompted_jobs(trait, trait.extraction_questions[:args.questions], "pos", n_per_question=1,
                                 fewshot=args.fewshot, stage="extraction", every_instruction=True)
    zeroshot_jobs = [{**job, "system": None, "demonstrations": []} for job in fewshot_jobs]
    mean_prompt_tokens = {name: round(sum(len(tokenizer(tokenizer.apply_chat_template(conversation(j), add_generation_prompt=True,
                                                                                     tokenize=False), add_special_tokens=False)["input_ids"])
                                          for j in jobs) / len(jobs), 1)
                          for name, jobs in (("zero", zeroshot_jobs), ("few", fewshot_jobs))}
    print(f"{model_label(args.model)}: {len(fewshot_jobs)} prompts, {args.fewshot} demonstrations, mean prompt tokens "
          f"zero-shot {mean_prompt_tokens['zero']}, few-shot {mean_prompt_tokens['few']}; {args.max_new_tokens} new tokens, "
          f"batch {args.batch_size}, {torch.get_num_threads()} threads", flush=True)

    settings = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    batch_size=args.batch_size, seed=args.seed)
    runs = {}
    with tempfile.TemporaryDirectory() as folder:
        with prefix_reuse(True):  # warm-up: first calls pay one-off costs
            generate_records(model, tokenizer, fewshot_jobs[:2], Path(folder) / "warmup.jsonl", max_new_tokens=2,
                             temperature=0, batch_size=2, desc="warm-up")
        for repeat in range(args.repeats):
            for name, jobs, reuse in (("zeroshot_plain", zeroshot_jobs, False), ("fewshot_plain", fewshot_jobs, False),
                                      ("zeroshot_reuse", zeroshot_jobs, True), ("fewshot_reuse", fewshot_jobs, True)):
                with prefix_reuse(reuse):
                    records, seconds = timed(lambda: generate_records(model, tokenizer, jobs, Path(folder) / f"{name}-{repeat}.jsonl",
                                                                      desc=name, **settings))
                tokens = sum(len(tokenizer(r["messages"][-1]["content"], add_special_tokens=False)["input_ids"]) for r in records)
                print(f"{name:15s} {seconds:8.1f} s  {tokens:6d} tokens  {1000 * seconds / max(tokens, 1):7.2f} ms/token", flush=True)
                if name not in runs or seconds < runs[name]["seconds"]:
                    runs[name] = {"seconds": round(seconds, 2), "answer_tokens": tokens,
                                  "ms_per_token": round(1000 * seconds / max(tokens, 1), 2), "records": records}

    records = runs["fewshot_reuse"]["records"]
    old_seconds = new_seconds = float("inf")
    for repeat in range(args.repeats):
        old, seconds = timed(lambda: second_pass_hidden_means(model, tokenizer, records, args.hidden_batch_size))
        old_seconds = min(old_seconds, seconds)
        new, seconds = timed(lambda: response_hidden_means(model, tokenizer, records, with_context=True,
                                                           batch_size=args.hidden_batch_size, desc="hidden states (reuse)"))
        new_seconds = min(new_seconds, seconds)
        print(f"hidden states: second pass {old_seconds:.1f} s, over the cached prefixes {new_seconds:.1f} s", flush=True)

    def per_token(name):
        return 1000 * runs[name]["seconds"] / max(runs[name]["answer_tokens"], 1)

    same = sum(a["messages"] == b["messages"] for a, b in zip(runs["fewshot_plain"]["records"], runs["fewshot_reuse"]["records"]))
    result = {
        "model": model_label(args.model), "prompts": len(fewshot_jobs), "fewshot": args.fewshot, "repeats": args.repeats,
        "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
        "mean_prompt_tokens": mean_prompt_tokens,
        "runs": {name: {k: v for k, v in run.items() if k != "records"} for name, run in runs.items()},
        "fewshot_over_zeroshot_per_token": round(per_token("fewshot_reuse") / per_token("zeroshot_reuse"), 3),
        "fewshot_over_zeroshot_per_token_without_reuse": round(per_token("fewshot_plain") / per_token("zeroshot_plain"), 3),
        # A batch decodes until its longest answer ends, so shorter answers cost as many steps: the
        # same prompts' wall-time ratio, beside the per-answer-token one.
        "fewshot_over_zeroshot_time": round(runs["fewshot_reuse"]["seconds"] / runs["zeroshot_reuse"]["seconds"], 3),
        "fewshot_reuse_speedup": round(runs["fewshot_plain"]["seconds"] / runs["fewshot_reuse"]["seconds"], 3),
        "zeroshot_reuse_speedup": round(runs["zeroshot_plain"]["seconds"] / runs["zeroshot_reuse"]["seconds"], 3),
        "fewshot_answers_identical_with_reuse": f"{same}/{len(records)}",
        "hidden_state_seconds": {"second_pass": round(old_seconds, 2), "cached_prefix": round(new_seconds, 2)},
        "hidden_state_speedup": round(old_seconds / new_seconds, 3),
        "hidden_state_max_abs_difference": float((old - new).abs().max()),
        "hidden_state_max_relative_difference": float(((old - new).norm(dim=-1) / old.norm(dim=-1).clamp_min(1e-12)).max()),
    }
    print(f"\nfew-shot / zero-shot time per generated token: {result['fewshot_over_zeroshot_per_token']:.2f}x with reuse "
          f"({result['fewshot_over_zeroshot_per_token_without_reuse']:.2f}x without); same prompts' time: "
          f"{result['fewshot_over_zeroshot_time']:.2f}x")
    print(f"few-shot elicitation with reuse: {result['fewshot_reuse_speedup']:.2f}x faster; answers identical to the plain "
          f"path's (same seeds): {result['fewshot_answers_identical_with_reuse']}")
    print(f"hidden-state stage: {result['hidden_state_speedup']:.2f}x faster than the second pass "
          f"(largest difference {result['hidden_state_max_abs_difference']:.2e}, relative {result['hidden_state_max_relative_difference']:.2e})")
    if args.output:
        write_json(args.output, result)  # atomic, with its folder
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
