"""Where the stages write a trait's outputs for a model, as shell assignments for the drivers, so
the layout lives in one place (model_loading.py):

    eval "$(python scripts/persona_paths.py --model "$MODEL" --trait evil)"
    echo "$persona_dir $diff_path $vector_path $finetune_data_dir $model_name"
"""

import shlex


from io_utils import ArgumentParser, run_cli
from model_loading import default_judge_data_dir, default_persona_paths, model_short_name, persona_dir

FINETUNE_DATA = "finetune_data"


def main():
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--trait", required=True)
    parser.add_argument("--prefix", default="", help="prefix of the variable names (e.g. other_)")
    args = parser.parse_args()
    diff_path, vector_path = default_persona_paths(args.model, args.trait)
    paths = {"model_name": model_short_name(args.model), "persona_dir": persona_dir(args.model, args.trait),
             "diff_path": diff_path, "vector_path": vector_path, "judge_data_dir": default_judge_data_dir(args.model, args.trait),
             "finetune_data_dir": persona_dir(args.model, args.trait) / FINETUNE_DATA}
    for name, value in paths.items():
        print(f"{args.prefix}{name}={shlex.quote(str(value))}")


if __name__ == "__main__":
    run_cli(main)
