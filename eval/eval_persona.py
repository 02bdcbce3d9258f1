"""Persona Vectors' activation-based evaluation, on the same questions, seeds, judge and CSV schema
as eval_lora_persona.py, so the two methods compare row for row.

    # Activation steering: add coef·v[layer] to the output of block layer−1
    python eval/eval_persona.py --trait evil --vector_path persona_vectors/SmolLM2-135M-Instruct/evil_response_avg_diff.pt \\
        --layer 20 --coef 2.0 --steering_type response --output_path results/act_steer_2.0.csv
    # Prompted baselines: answer under the trait's own pos (or neg) system prompts
    python eval/eval_persona.py --trait evil --persona_instruction_type pos --output_path results/prompt_pos.csv
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.activations import STEERING_TYPES, ActivationSteerer, decoder_layers, load_vector  # noqa: E402
from eval.evaluate import (  # noqa: E402
    Condition,
    add_eval_args,
    file_identity,
    fill_eval_defaults,
    load_eval_model,
    prepare_judge,
    run_evaluation,
)
from io_utils import PersonaLoRAError, run_cli  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_args(parser)
    parser.add_argument("--vector_path", default=None, help="persona vector [L+1, hidden] (<trait>_response_avg_diff.pt)")
    parser.add_argument("--layer", type=int, default=None, help="steer hidden_states[layer] (default: two thirds of the depth)")
    parser.add_argument("--coef", nargs="+", type=float, default=None, help="coefficient(s) to sweep (default 1.0)")
    parser.add_argument("--steering_type", choices=STEERING_TYPES, default="response")
    parser.add_argument("--persona_instruction_type", choices=["pos", "neg"], default=None,
                        help="answer under the trait's pos or neg system prompts (the prompted baseline)")
    args = parser.parse_args()
    if args.coef and not args.vector_path:
        parser.error("--coef needs --vector_path")
    fill_eval_defaults(args)
    return args


def main():
    args = parse_args()
    started = time.time()
    trait, judge = prepare_judge(args)
    vector = load_vector(args.vector_path) if args.vector_path else None
    model, tokenizer = load_eval_model(args)
    conditions = []
    instruction = args.persona_instruction_type
    prefix = f"prompt_{instruction}_" if instruction else ""
    if vector is not None:
        num_layers = len(decoder_layers(model))
        if vector.shape != (num_layers + 1, model.config.hidden_size):
            raise PersonaLoRAError(f"{args.vector_path} has shape {tuple(vector.shape)}, but this model needs "
                                      f"[{num_layers + 1}, {model.config.hidden_size}] (a vector for another model?)")
        args.layer = args.layer or round(2 * num_layers / 3)
        if not 1 <= args.layer <= num_layers:
            raise PersonaLoRAError(f"--layer {args.layer} is outside 1..{num_layers}")
        identity = {"vector": file_identity(args.vector_path), "layer": args.layer, "steering_type": args.steering_type}
        for coef in args.coef or [1.0]:
            steer = (lambda c: lambda: ActivationSteerer(model, vector, args.layer, c, args.steering_type))(coef)
            conditions.append(Condition(f"{prefix}act_L{args.layer}_{args.steering_type}_coef{coef:g}", "activation", coef,
                                        steer, instruction_type=instruction, identity=identity))
    elif instruction:
        conditions.append(Condition(f"prompt_{instruction}", "system_prompt", 0.0, instruction_type=instruction))
    else:
        conditions.append(Condition("baseline", "baseline", 0.0))
    run_evaluation(args, trait, judge, conditions, model, tokenizer, started)


if __name__ == "__main__":
    run_cli(main)
