"""Exported personas in llama.cpp against transformers, on the embedded model's own GGUF.

    python bench/bench_gguf_export.py --lora_diff_path persona_loras/SmolLM2-135M-Instruct/*/*_lora_diff.pt \\
        --vector_path persona_vectors/SmolLM2-135M-Instruct/evil_response_avg_diff.pt --layer 20
    python bench/bench_gguf_export.py --synthetic   # no extracted persona: a random diff and vector of known size

For each diff, its GGUF LoRA export in llama.cpp at scale α against α·ΔW merged in transformers;
for each vector, its control-vector export at strength c against activation steering c·v[layer]
at every position (eval/llama_cpp_runtime.py): the KL between the runtimes' next-token
distributions at every position of four fixed conversations, on the model's 4-bit GGUF (with its
ratio to the base model's own gap between the runtimes) and on a float32 copy of it (exactness),
the size of the steering itself, and the correlation of the log-probability changes. Then
llama.cpp's greedy decoding speed on the 4-bit GGUF with the first diff's LoRA against without
(one run, alternating rounds). Prints a markdown table. Synthetic rows are labelled so: they
measure the export, not a trait.
"""

import argparse
import tempfile
from pathlib import Path

import torch

import gguf_export
import lora_utils as lu
from eval import llama_cpp_runtime as rt
from eval.activations import load_vector
from model_loading import embedded_gguf_file, load_model_and_tokenizer

SYNTHETIC_DIFF_NORM = 0.03  # ‖ΔW‖ / ‖W‖ per module: a steering KL well above the quantisation gap
SYNTHETIC_VECTOR_NORM = 0.25  # ‖v[ℓ]‖ / median ‖hidden_states[ℓ]‖


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lora_diff_path", nargs="*", default=[])
    parser.add_argument("--vector_path", nargs="*", default=[])
    parser.add_argument("--layer", type=int, default=20, help="the layer of the vectors' control-vector export")
    parser.add_argument("--coefs", nargs="+", type=float, default=[1.0, 2.0])
    parser.add_argument("--synthetic", action="store_true", help="add a synthetic diff and vector (labelled synthetic)")
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp and torch threads (more spin badly on shared cores)")
    args = parser.parse_args()
    if not (args.lora_diff_path or args.vector_path or args.synthetic):
        parser.error("give --lora_diff_path, --vector_path or --synthetic")
    return args


def rows(kind: str, source: str, results: dict) -> list[str]:
    quantized, exact = results["Q4_1"], results["float32"]
    return [f"| {kind} | {source} | {c:g} | {v['steering_kl']:.4f} | {v['kl']:.4f} ({v['ratio_to_gap']:.2f}×) | "
            f"{v['correlation']:.3f} | {exact['coefficients'][c]['kl']:.1e} | {exact['coefficients'][c]['correlation']:.4f} |"
            for c, v in quantized["coefficients"].items()]


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    layout = gguf_export.gguf_layout(None)
    diffs = [(Path(p).name, lu.load_lora_diff(p)) for p in args.lora_diff_path]
    vectors = [(Path(p).name, load_vector(p)) for p in args.vector_path]
    for _, vector in vectors:
        gguf_export.check_steering_vector(vector, args.layer, layout)
    model, tokenizer = load_model_and_tokenizer(None, dtype="float32")
    sequences = rt.check_sequences(tokenizer)
    if args.synthetic:
        diffs.append((f"synthetic (random rank 4, ‖ΔW‖ = {SYNTHETIC_DIFF_NORM}·‖W‖)", rt.synthetic_diff(model, SYNTHETIC_DIFF_NORM)))
        vectors.append((f"synthetic (random, ‖v[ℓ]‖ = {SYNTHETIC_VECTOR_NORM}·median ‖h_ℓ‖)",
                        rt.synthetic_vector(model, sequences, SYNTHETIC_VECTOR_NORM)))
    quantized = rt.LlamaCppRuntime(embedded_gguf_file(), n_threads=args.threads)
    exact = rt.LlamaCppRuntime(rt.embedded_float32_gguf(), n_threads=args.threads)
    lines, gap, speed = [], None, None
    with tempfile.TemporaryDirectory() as workdir:
        for index, (source, diff) in enumerate(diffs):
            path = diff.to_gguf(Path(workdir) / f"diff{index}.gguf", layout)
            results = rt.lora_export_agreement(model, sequences, diff, {"Q4_1": (quantized, path), "float32": (exact, path)}, args.coefs)
            gap = results["Q4_1"]["quantisation_gap"], results["float32"]["quantisation_gap"]
            lines += rows("LoRA (GGUF adapter)", source, results)
            if speed is None:
                speed = rt.lora_speed(quantized, sequences[0], path, 1.0, args.new_tokens, args.rounds), source
        for index, (source, vector) in enumerate(vectors):
            path = gguf_export.write_control_vector_gguf(vector, args.layer, Path(workdir) / f"vector{index}.gguf", layout)
            results = rt.control_vector_agreement(model, sequences, vector, args.layer,
                                                  {"Q4_1": (quantized, path), "float32": (exact, path)}, args.coefs)
            gap = results["Q4_1"]["quantisation_gap"], results["float32"]["quantisation_gap"]
            lines += rows(f"control vector, layer {args.layer}", source, results)
    quantized.close()
    exact.close()
    print(f"Embedded {layout.model}: transformers on the GGUF's weights dequantized to float32 against llama.cpp on the "
          f"Q4_1 GGUF and on its float32 copy; {sum(map(len, sequences))} positions of {len(sequences)} conversations; "
          f"{args.threads} thread(s).\n")
    print(f"Gap with nothing applied, KL(transformers ‖ llama.cpp): {gap[0]:.4f} nats/token on Q4_1, {gap[1]:.1e} on float32\n")
    print("| export | source | coefficient | steering KL(steered ‖ plain), transformers | KL(transformers ‖ llama.cpp Q4_1), "
          "both steered (× gap) | logit-change r, Q4_1 | KL, float32 GGUF | logit-change r, float32 |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))
    if speed is not None:
        values, source = speed
        print(f"\nllama.cpp greedy decoding on Q4_1, {values['new_tokens']} tokens after a {len(sequences[0])}-token prompt, median of "
              f"{values['rounds']} alternating rounds: {values['plain']:.1f} tokens/s plain, {values['lora']:.1f} with the LoRA "
              f"of {source} (ratio {values['ratio']:.2f})")


if __name__ == "__main__":
    main()
