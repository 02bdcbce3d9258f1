"""Persona Vectors' activation projection: for a CSV of responses (prompt and answer columns, as
eval_lora_persona.py and eval/eval_persona.py write them), add the projection of the mean
response-token hidden state onto the persona vector at chosen layers:

    <trait>_proj_layer<ℓ> = mean_response(h[ℓ]) · v[ℓ] / ‖v[ℓ]‖

    python eval/cal_projection.py --file_path results/baseline.csv \\
        --vector_path persona_vectors/SmolLM2-135M-Instruct/evil_response_avg_diff.pt --layer 20
"""

import time
from pathlib import Path


from eval.activations import (
    load_vector,
    span_hidden_means,
)
from io_utils import ArgumentParser, PersonaLoRAError, atomic_path, check_writable, positive_int, run_cli
from model_loading import load_model_and_tokenizer


def prompt_answer_span(tokenizer, prompt: str, answer: str) -> tuple[list[int], int, int]:
    """Token ids of prompt + answer, where the answer starts and where it ends (the CSV's answer
    holds the answer's text only, so it ends with the sequence)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
    start = len(prompt_ids) if full_ids[: len(prompt_ids)] == prompt_ids else len(prompt_ids) - 1  # a merged boundary token
    return full_ids, start, len(full_ids)


def main():
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--file_path", required=True, help="CSV with prompt and answer columns")
    parser.add_argument("--vector_path", required=True)
    parser.add_argument("--layer", type=int, nargs="+", required=True)
    parser.add_argument("--model", default=None)
    parser.add_argument("--trait", default=None, help="column prefix (default: from the vector's file name)")
    parser.add_argument("--output_path", default=None, help="default: rewrite --file_path (atomically)")
    parser.add_argument("--batch_size", type=positive_int, default=16)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    import pandas as pd

    started = time.time()
    if not Path(args.file_path).is_file():
        raise PersonaLoRAError(f"--file_path {args.file_path} not found")
    frame = pd.read_csv(args.file_path)
    if not {"prompt", "answer"} <= set(frame.columns):
        raise PersonaLoRAError(f"{args.file_path} needs prompt and answer columns (has {', '.join(frame.columns)})")
    check_writable(args.output_path or args.file_path, "--output_path")
    vector = load_vector(args.vector_path)
    bad = [layer for layer in args.layer if not 0 <= layer < vector.shape[0]]
    if bad:
        raise PersonaLoRAError(f"--layer {bad[0]} is outside 0..{vector.shape[0] - 1} for {args.vector_path}")
    trait = args.trait or Path(args.vector_path).stem.split("_response")[0]
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype)
    if vector.shape[1] != model.config.hidden_size:
        raise PersonaLoRAError(f"{args.vector_path} has hidden size {vector.shape[1]}, the model {model.config.hidden_size}")
    spans = [prompt_answer_span(tokenizer, str(p), "" if a != a else str(a)) for p, a in zip(frame["prompt"], frame["answer"])]
    means = span_hidden_means(model, spans, tokenizer.pad_token_id, args.batch_size, desc="projecting")
    for layer in args.layer:
        direction = vector[layer] / vector[layer].norm()
        frame[f"{trait}_proj_layer{layer}"] = (means[:, layer] @ direction).tolist()
    output_path = Path(args.output_path or args.file_path)
    with atomic_path(output_path) as tmp:
        frame.to_csv(tmp, index=False)
    summary = ", ".join(f"layer {layer}: mean {frame[f'{trait}_proj_layer{layer}'].mean():.3f}" for layer in args.layer)
    print(f"added {len(args.layer)} projection column(s) to {output_path} ({summary}) in {time.time() - started:.0f} s")


if __name__ == "__main__":
    run_cli(main)
