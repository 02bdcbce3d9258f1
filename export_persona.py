"""Export a persona for other runtimes: a persona diff as a GGUF LoRA adapter (llama.cpp,
llama-server, Ollama) or a PEFT adapter (PEFT, vLLM), a persona vector as a llama.cpp control vector.

    # GGUF LoRA adapter for the base model's GGUF; the runtime's LoRA scale is the coefficient α
    python export_persona.py --lora_diff_path persona_loras/SmolLM2-135M-Instruct/evil/evil_lora_diff.pt \\
        --format gguf --output evil.gguf
    llama-server -m SmolLM2-135M-Instruct.Q4_1.gguf --lora-scaled evil.gguf 0   # then per request: "lora": [{"id": 0, "scale": 1.5}]
    # PEFT adapter with α·ΔW baked in (vLLM: --enable-lora --lora-modules evil=DIR)
    python export_persona.py --lora_diff_path P --format peft --coef 1.5 --output evil_peft
    # The activation vector at layer ℓ as a control vector; the runtime's strength is the coefficient c
    python export_persona.py --vector_path persona_vectors/SmolLM2-135M-Instruct/evil_response_avg_diff.pt \\
        --layer 20 --format gguf_control_vector --output evil_layer20.gguf
    llama-cli -m SmolLM2-135M-Instruct.Q4_1.gguf --control-vector-scaled evil_layer20.gguf 2.0

The GGUF formats take the architecture, tensor names and the q/k row order from --model's config
(the embedded SmolLM2-135M-Instruct by default); no weights are loaded. The control vector steers
every position, as Persona Vectors' activation steering with --steering_type all does at the same
layer (direction.(ℓ−1) is added to the output of block ℓ−1; see gguf_export.py). Every input is
checked before anything is written, and the output is written to a temporary file and renamed.
"""

from pathlib import Path

import gguf_export
import lora_utils as lu
from eval.activations import load_vector
from io_utils import ArgumentParser, check_writable, check_writable_dir, finite_float, run_cli
from model_loading import check_model_source, model_label

FORMATS = ("gguf", "peft", "gguf_control_vector")


def parse_args():
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--output", required=True, help="the .gguf file, or the PEFT adapter folder")
    parser.add_argument("--lora_diff_path", default=None, help="persona diff (.pt or .safetensors), for gguf and peft")
    parser.add_argument("--vector_path", default=None, help="persona vector [L+1, hidden], for gguf_control_vector")
    parser.add_argument("--layer", type=int, default=None, help="gguf_control_vector: the layer ℓ whose v[ℓ] is exported")
    parser.add_argument("--coef", type=finite_float, default=None,
                        help="peft only: the coefficient baked into the adapter (default 1); GGUF files take it at run time")
    parser.add_argument("--model", default=None, help="the base model, hub id or folder (default: the embedded SmolLM2-135M-Instruct)")
    args = parser.parse_args()
    if args.format == "gguf_control_vector":
        if args.vector_path is None or args.layer is None:
            parser.error("--format gguf_control_vector needs --vector_path and --layer")
        if args.lora_diff_path is not None:
            parser.error("--format gguf_control_vector exports a vector: give --vector_path, not --lora_diff_path")
    else:
        if args.lora_diff_path is None:
            parser.error(f"--format {args.format} needs --lora_diff_path")
        if args.vector_path is not None or args.layer is not None:
            parser.error(f"--format {args.format} exports a diff: --vector_path and --layer belong to gguf_control_vector")
    if args.coef is not None and args.format != "peft":
        parser.error("--coef is for --format peft only: a GGUF file takes its coefficient at run time "
                     "(--lora-scaled F α, --control-vector-scaled F c)")
    return args


def main():
    args = parse_args()
    # Refusals first, all before anything is written: inputs, the output location, the model's config.
    check_model_source(args.model)
    if args.format == "gguf_control_vector":
        vector = load_vector(args.vector_path)
        layout = gguf_export.gguf_layout(args.model)
        gguf_export.check_steering_vector(vector, args.layer, layout)
        check_writable(args.output, "--output")  # last: a refused export leaves no folder behind
        gguf_export.write_control_vector_gguf(vector, args.layer, args.output, layout)
        print(f"wrote {args.output}: v[{args.layer}] of {args.vector_path} as a llama.cpp control vector for {layout.model} "
              f"(direction.{args.layer - 1}: added to the output of block {args.layer - 1}); "
              f"use --control-vector-scaled {args.output} c")
        return
    diff = lu.load_lora_diff(args.lora_diff_path)
    if args.format == "peft":
        check_writable_dir(args.output, "--output")
        coefficient = 1.0 if args.coef is None else args.coef
        base = model_label(args.model) if args.model else None  # otherwise the diff's own base model
        diff.to_peft_adapter(args.output, coefficient, base_model_name_or_path=base)
        print(f"wrote {args.output}: a PEFT LoRA adapter of {coefficient:g}·ΔW ({len(diff)} modules)")
        return
    layout = gguf_export.gguf_layout(args.model)
    gguf_export.lora_tensors(diff, layout)  # every module mapped and of the model's shape, before anything is written
    check_writable(args.output, "--output")
    diff.to_gguf(args.output, layout)
    print(f"wrote {args.output}: a GGUF LoRA adapter of ΔW for {layout.model} ({len(diff)} modules, "
          f"{Path(args.output).stat().st_size / 2**20:.1f} MiB); use --lora-scaled {args.output} α")


if __name__ == "__main__":
    run_cli(main)
