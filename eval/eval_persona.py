"""Persona Vectors' activation-based evaluation, on the same questions, seeds, judge and CSV schema
as eval_lora_persona.py, so the two methods compare row for row.

    # Activation steering: add coef·v[layer] to the output of block layer−1
    python eval/eval_persona.py --trait evil --vector_path persona_vectors/SmolLM2-135M-Instruct/evil_response_avg_diff.pt \\
        --layer 20 --coef 2.0 --steering_type response --output_path results/act_steer_2.0.csv
    # Prompted baselines: answer under the trait's own pos (or neg) system prompts (and --fewshot demonstrations)
    python eval/eval_persona.py --trait evil --persona_instruction_type pos --output_path results/prompt_pos.csv
    # Forced choice: A/B items in the public format under each coefficient, no judge
    python eval/eval_persona.py --trait evil --vector_path V --layer 20 --coef -2 0 2 --ab_data dataset/evil/ab.jsonl \\
        --output_path results/act_ab.csv
"""



from eval.activations import STEERING_TYPES, ActivationSteerer, check_vector_fits
from eval.evaluate import Condition, add_eval_args, load_eval_model, on_finetune, prepare_evaluation, run_evaluation
from io_utils import ArgumentParser, file_identity, finite_float, run_cli
from model_loading import model_config


def parse_args():
    parser = ArgumentParser(description=__doc__)
    add_eval_args(parser)
    parser.add_argument("--vector_path", default=None, help="persona vector [L+1, hidden] (<trait>_response_avg_diff.pt)")
    parser.add_argument("--layer", type=int, default=None, help="steer hidden_states[layer], 1..L−1 (default: two thirds of the depth)")
    parser.add_argument("--coef", nargs="+", type=finite_float, default=None, help="coefficient(s) to sweep (default 1.0)")
    parser.add_argument("--steering_type", choices=STEERING_TYPES, default="response")
    parser.add_argument("--persona_instruction_type", choices=["pos", "neg"], default=None,
                        help="answer under the trait's pos or neg system prompts (the prompted baseline)")
    args = parser.parse_args()
    if args.coef and not args.vector_path:
        parser.error("--coef needs --vector_path")
    if args.layer is not None and not args.vector_path:
        parser.error("--layer needs --vector_path")
    return args


def check_vector(args):
    """The vector and the layer against the model's config, before the model loads."""
    vector, args.layer = check_vector_fits(args.vector_path, model_config(args.model), args.layer)
    return vector


def main():
    args = parse_args()
    vector = check_vector(args) if args.vector_path else None
    run = prepare_evaluation(args)
    model, tokenizer = load_eval_model(run)
    conditions = []
    instruction = args.persona_instruction_type
    prefix = f"prompt_{instruction}_" if instruction else ""
    if vector is not None:
        identity = {"vector": file_identity(args.vector_path), "layer": args.layer, "steering_type": args.steering_type}
        for coef in args.coef or [1.0]:
            steer = (lambda c: lambda: ActivationSteerer(model, vector, args.layer, c, args.steering_type))(coef)
            conditions.append(Condition(f"{prefix}act_L{args.layer}_{args.steering_type}_coef{coef:g}", "activation", coef,
                                        steer, instruction_type=instruction, identity=identity))
    elif instruction:
        conditions.append(Condition(f"prompt_{instruction}", "system_prompt", 0.0, instruction_type=instruction))
    else:
        conditions.append(Condition("baseline", "baseline", 0.0))
    run_evaluation(run, on_finetune(run, model, conditions), model, tokenizer)


if __name__ == "__main__":
    run_cli(main)
