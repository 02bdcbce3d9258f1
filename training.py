"""Supervised finetuning on chat JSONL (loss on the assistant's response only): a LoRA adapter or a
dense finetune of the target modules, with optional preventative steering and a weight-space drift
monitor.

    python training.py configs/llama_3.1_8b_lora_steer.json
    accelerate launch --num_processes 2 training.py configs/smollm2_135m.json     # data parallel: GPUs, or CPU processes

The config (JSON, validated before the model loads: unknown keys, wrong types and out-of-range
values are errors naming the key):

    model             hub id or local folder; null = the embedded SmolLM2-135M-Instruct
    training_file     chat JSONL ({"messages": [...]} per line, last message the assistant's)
    output_dir        where the result is saved: a PEFT adapter folder (method "lora") or a full
                      checkpoint (method "dense"), with training.json
    method            "lora" (default) or "dense": every weight of the target modules trained, no
                      adapter; saved as a full checkpoint, as most finetunes that users project are
    rank, alpha, use_rslora   LoRA only (rank ≥ 1)
    target_modules, epochs (≥ 1), learning_rate (> 0), batch_size (≥ 1), max_length (≥ 16), seed, dtype
    init_seed         optional: the adapter's initialisation seed. By default it is drawn from the
                      finetune stream of `seed`, never the stream the persona adapters use, so a
                      finetune never starts from their lora_A; an explicit init_seed that
                      reproduces the initialisation of a persona diff named in the config is refused
    max_examples      optional cap on the number of training examples (first N)
    heldout_questions optional, default 0: every answer to this many of the file's questions is held
                      out (the questions whose text hashes lowest, so every finetune on answers to
                      the same questions holds out the same ones), never trained on, and measures
                      whether the finetune learned its task: after training, with any steering
                      removed, the mean response-token loss of the plain model + finetune on them,
                      beside the base model's (finetune_report.json, with the update's norm)
    steering_config   optional preventative steering, active for the whole of training, removed after:
        {"type": "lora", "lora_diff_path": "...", "coef": -1.0}        W ← W + coef·ΔW while training
        {"type": "activation", "vector_path": "...", "layers": [20], "coef": 1.0}   h[ℓ] += coef·v[ℓ]
    monitor           optional drift alarm: {"lora_diff_path": "...", "every": 10} logs the finetune's
                      weight projection onto the persona diff every N steps (no generation, no judge)

The saved finetune is always relative to the unsteered base: evaluate it on the plain model.
finetune_report.json (beside it, every run) holds ‖W_ft − W‖_F (one Frobenius norm over the whole
update, and per module type) and, with heldout_questions, the held-out loss.
Persona Vectors found that steering *toward* the trait while training (positive coef) keeps the
finetune from acquiring it; the original README suggested a negative one (kept in
configs/llama_3.1_8b_lora_steer.json), the embedded configs use +1. Both signs are supported.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import lora_utils as lu
from eval.activations import ActivationSteerer, check_vector_fits, load_vector
from eval.evaluate import finetune_steer
from eval.generation import read_chat_jsonl
from io_utils import (
    PersonaLoRAError,
    check_writable_dir,
    file_identity,
    read_json_object,
    remove_stale_temporaries,
    run_cli,
    write_json,
    write_manifest,
)
from model_loading import (
    check_dtype,
    check_model_source,
    load_model_and_tokenizer,
    model_config,
    model_identity,
    model_label,
)
from trainer import (
    DEFAULT_TARGETS,
    encode_examples,
    finished_adapter,
    init_seed,
    mean_response_loss,
    question_of,
    records_digest,
    split_heldout,
    train_dense,
    train_lora_adapter,
    update_norms,
)

REPORT = "finetune_report.json"

CONFIG_SCHEMA = {  # key: (types, required, default)
    "model": ((str, type(None)), False, None),
    "training_file": ((str,), True, None),
    "output_dir": ((str,), True, None),
    "method": ((str,), False, "lora"),
    "rank": ((int,), False, 8),
    "alpha": ((int, float), False, 16),
    "use_rslora": ((bool,), False, False),
    "target_modules": ((list,), False, DEFAULT_TARGETS),
    "epochs": ((int,), False, 1),
    "learning_rate": ((int, float), False, 2e-4),
    "batch_size": ((int,), False, 8),
    "max_length": ((int,), False, 512),
    "max_examples": ((int, type(None)), False, None),
    "heldout_questions": ((int,), False, 0),
    "seed": ((int,), False, 0),
    "init_seed": ((int, type(None)), False, None),
    "dtype": ((str,), False, "auto"),
    "steering_config": ((dict, type(None)), False, None),
    "monitor": ((dict, type(None)), False, None),
}
STEERING_SCHEMA = {
    "lora": {"type": (str,), "lora_diff_path": (str,), "coef": (int, float)},
    "activation": {"type": (str,), "vector_path": (str,), "layers": (list,), "coef": (int, float)},
}
MONITOR_SCHEMA = {"lora_diff_path": (str,), "every": (int,)}
# key: (lowest accepted, why)
RANGES = {"rank": (1, "a LoRA needs rank ≥ 1"), "epochs": (1, "train at least one epoch"),
          "batch_size": (1, "a batch holds at least one example"), "max_length": (16, "room for a question and an answer"),
          "max_examples": (1, "train on at least one example"), "heldout_questions": (0, "a number of questions")}


def _check_keys(where: str, given: dict, schema: dict, path: Path) -> None:
    for key, value in given.items():
        if key not in schema:
            raise PersonaLoRAError(f"{path}: unknown key '{where}{key}' (known: {', '.join(schema)})")
        types = schema[key][0] if isinstance(schema[key][0], tuple) else schema[key]
        if isinstance(value, bool) and bool not in types:  # JSON true is not a number here
            raise PersonaLoRAError(f"{path}: '{where}{key}' must be {' or '.join(t.__name__ for t in types)}, not a boolean")
        if not isinstance(value, types):
            raise PersonaLoRAError(f"{path}: '{where}{key}' must be {' or '.join(t.__name__ for t in types)}, "
                                   f"not {type(value).__name__}")


def _check_ranges(config: dict, path: Path) -> None:
    for key, (lowest, why) in RANGES.items():
        if config[key] is not None and config[key] < lowest:
            raise PersonaLoRAError(f"{path}: '{key}' is {config[key]}, must be ≥ {lowest} ({why})")
    if not (math.isfinite(config["learning_rate"]) and config["learning_rate"] > 0):
        raise PersonaLoRAError(f"{path}: 'learning_rate' is {config['learning_rate']}, must be a finite number > 0")
    if not (math.isfinite(config["alpha"]) and config["alpha"] > 0):
        raise PersonaLoRAError(f"{path}: 'alpha' is {config['alpha']}, must be a finite number > 0")
    if config["method"] not in ("lora", "dense"):
        raise PersonaLoRAError(f"{path}: 'method' is {config['method']!r}, must be 'lora' or 'dense'")
    if not config["target_modules"] or not all(isinstance(m, str) and m for m in config["target_modules"]):
        raise PersonaLoRAError(f"{path}: 'target_modules' must be a non-empty list of module names")
    steering = config["steering_config"]
    if steering is not None and not math.isfinite(steering["coef"]):
        raise PersonaLoRAError(f"{path}: 'steering_config.coef' must be a finite number")
    if steering is not None and steering["type"] == "lora" and config["method"] == "dense":
        raise PersonaLoRAError(f"{path}: a dense finetune cannot train under a merged persona LoRA (its removal would undo "
                               "the training); use activation steering or method 'lora'")
    monitor = config["monitor"]
    if monitor is not None and monitor["every"] < 1:
        raise PersonaLoRAError(f"{path}: 'monitor.every' is {monitor['every']}, must be ≥ 1")


def load_config(path: str | os.PathLike) -> dict:
    path = Path(path)
    config = read_json_object(path, "config")
    _check_keys("", config, CONFIG_SCHEMA, path)
    for key, (_, required, default) in CONFIG_SCHEMA.items():
        if key not in config:
            if required:
                raise PersonaLoRAError(f"{path}: the key '{key}' is required")
            config[key] = default
    steering = config["steering_config"]
    if steering is not None:
        if steering.get("type") not in STEERING_SCHEMA:
            raise PersonaLoRAError(f"{path}: 'steering_config.type' must be 'lora' or 'activation'")
        schema = STEERING_SCHEMA[steering["type"]]
        _check_keys("steering_config.", steering, schema, path)
        missing = [k for k in schema if k not in steering]
        if missing:
            raise PersonaLoRAError(f"{path}: 'steering_config.{missing[0]}' is required for {steering['type']} steering")
        if steering["type"] == "activation" and not (steering["layers"] and all(
                isinstance(x, int) and not isinstance(x, bool) for x in steering["layers"])):
            raise PersonaLoRAError(f"{path}: 'steering_config.layers' must be a non-empty list of integers")
    if config["monitor"] is not None:
        _check_keys("monitor.", config["monitor"], MONITOR_SCHEMA, path)
        if set(MONITOR_SCHEMA) - set(config["monitor"]):
            raise PersonaLoRAError(f"{path}: 'monitor' needs both 'lora_diff_path' and 'every'")
    _check_ranges(config, path)
    return config


def persona_diffs_of(config: dict) -> list[str]:
    """The persona diffs a config names (steering and monitor)."""
    paths = [config["monitor"]["lora_diff_path"]] if config["monitor"] else []
    if config["steering_config"] and config["steering_config"]["type"] == "lora":
        paths.append(config["steering_config"]["lora_diff_path"])
    return paths


def check_independent_init(config: dict, adapter_init_seed: int, path: Path) -> None:
    """Refuse a LoRA finetune that would start from the initialisation of a persona diff it is
    compared with: same init seed, rank and target modules give the same lora_A."""
    if config["method"] != "lora":
        return
    for diff_path in persona_diffs_of(config):
        init = lu.load_lora_diff(diff_path).metadata.get("init") or {}
        if (init.get("seed") == adapter_init_seed and init.get("rank") == config["rank"]
                and sorted(init.get("target_modules") or []) == sorted(config["target_modules"])):
            raise PersonaLoRAError(f"{path}: this finetune would start from the same lora_A as the persona adapters of {diff_path} "
                                   f"(init seed {adapter_init_seed}, rank {config['rank']}, the same targets), so its projection "
                                   "onto that diff would be large by construction; drop 'init_seed' or choose another")


def check_config_inputs(config: dict, path: Path) -> dict:
    """Everything a config points at, checked before the model loads: the training data, the
    output folder, the diffs and vectors, the steering layers against the model's depth."""
    check_model_source(config["model"], f"{path}: 'model'")
    check_dtype(config["dtype"])
    try:
        records, heldout, heldout_questions = split_heldout(read_chat_jsonl(config["training_file"]), config["heldout_questions"])
    except PersonaLoRAError as error:
        raise PersonaLoRAError(f"{path}: 'heldout_questions': {error}") from None
    if config["max_examples"] is not None and len(records) < config["max_examples"]:
        print(f"note: {config['training_file']} holds {len(records)} examples outside the held-out questions, fewer than "
              f"max_examples {config['max_examples']}: training on all {len(records)}", file=sys.stderr)
    records = records[: config["max_examples"]]
    check_writable_dir(Path(config["output_dir"]).parent, f"{path}: 'output_dir'")
    for diff_path in persona_diffs_of(config):
        lu.load_lora_diff(diff_path)
    steering = config["steering_config"]
    if steering is not None and steering["type"] == "activation":
        model_settings = model_config(config["model"])
        for layer in steering["layers"]:
            check_vector_fits(steering["vector_path"], model_settings, layer, f"{path}: 'steering_config.vector_path'",
                              f"{path}: 'steering_config.layers' holds")
    return {"records": records, "heldout": heldout, "heldout_questions": heldout_questions}


def config_identity(config: dict, records: list[dict]) -> str:
    """What a finished finetune depends on: the whole config (whatever its file is called), the
    training examples, the content of the diffs and vectors it steers with or monitors (a
    re-extracted diff at the same path is another diff) and the base model's files. A rerun with
    the same identity reuses the finetune."""
    steering = config["steering_config"] or {}
    files = [*persona_diffs_of(config), *([steering["vector_path"]] if steering.get("type") == "activation" else [])]
    return hashlib.sha256(json.dumps({"config": {k: v for k, v in config.items() if k != "output_dir"}, "examples": records,
                                      "files": [file_identity(path)["sha256"] for path in files],
                                      "model": model_identity(config["model"])}, sort_keys=True).encode()).hexdigest()


def process_device_map():
    """Under `accelerate launch` each process holds a whole copy on its own device (data parallel);
    alone, the loader's default applies (one GPU, or device_map="auto" over several)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return {"": f"cuda:{os.environ.get('LOCAL_RANK', '0')}"} if torch.cuda.is_available() else {"": "cpu"}
    return None


def preventative_steering(config: dict, model) -> contextlib.AbstractContextManager:
    """The steering active during training: a merged persona LoRA or activation hooks."""
    steering = config["steering_config"]
    if steering is None:
        return contextlib.nullcontext()
    if steering["type"] == "lora":
        return lu.LoRASteerer(model, steering["lora_diff_path"], steering["coef"])
    vector = load_vector(steering["vector_path"])
    stack = contextlib.ExitStack()
    for layer in steering["layers"]:
        stack.enter_context(ActivationSteerer(model, vector, layer, steering["coef"], positions="all"))
    return stack


def finetune(config: dict, model, tokenizer, records: list[dict], adapter_init_seed: int, on_step=None,
             record_extra: dict | None = None) -> dict:
    """Train and save the finetune under the config's preventative steering, which is removed
    before this returns: `model` is then the plain model again, and the saved finetune is relative
    to it."""
    common = dict(target_modules=config["target_modules"], epochs=config["epochs"], learning_rate=config["learning_rate"],
                  batch_size=config["batch_size"], max_length=config["max_length"], seed=config["seed"], desc="finetuning",
                  on_step=on_step, record_extra=record_extra)
    with preventative_steering(config, model):
        if config["method"] == "dense":
            return train_dense(model, tokenizer, records, config["output_dir"], **common)
        return train_lora_adapter(model, tokenizer, records, config["output_dir"], rank=config["rank"], alpha=config["alpha"],
                                  use_rslora=config["use_rslora"], adapter_init_seed=adapter_init_seed,
                                  base_model_name=model_label(config["model"]), **common)


def finetune_report(config: dict, model, tokenizer, inputs: dict, identity: str) -> dict:
    """What the saved finetune did, measured on the plain model (any steering removed): the norm of
    its weight change and its mean response-token loss on the held-out questions' answers, beside the
    base model's on the same answers (did it learn the task?)."""
    report = {"config_identity": identity, "update": update_norms(model, config["output_dir"]),
              "trained_examples": len(inputs["records"]),
              "trained_questions": len({question_of(r) for r in inputs["records"]}), "heldout": None}
    if inputs["heldout"]:
        examples = encode_examples(tokenizer, inputs["heldout"], config["max_length"])  # once for the 2–4 models scored

        def loss() -> dict:
            return mean_response_loss(model, examples, tokenizer.pad_token_id, config["batch_size"])

        with_finetune = finetune_steer(model, config["output_dir"])
        base = loss()
        with with_finetune():
            finetuned = loss()
        report["heldout"] = {"questions": inputs["heldout_questions"], "examples": finetuned["examples"],
                             "tokens": finetuned["tokens"], "loss": finetuned["loss"], "base_loss": base["loss"],
                             "change": finetuned["loss"] - base["loss"],
                             "by_question": finetuned["by_question"], "base_by_question": base["by_question"],
                             "measured_on": "the plain model with the finetune, after any steering was removed; mean "
                                            "next-token loss over the held-out answers' response tokens (nats/token); "
                                            "by_question: each held-out question's answers"}
        if config["steering_config"] is not None:
            # Under the steering it was trained with, the finetune is judged on the objective it optimised:
            # a prevented finetune that learned the task fits the held-out answers there as well as an
            # unprevented one does without steering, while a finetune that learned less does not.
            with preventative_steering(config, model):
                steering_alone = loss()
                with with_finetune():
                    steered = loss()
            report["heldout"].update({
                "steered_loss": steered["loss"], "steered_by_question": steered["by_question"],
                "steering_alone_loss": steering_alone["loss"], "steering_alone_by_question": steering_alone["by_question"],
                "steered_measured_on": "the finetune with its training-time steering on (the objective it optimised); "
                                       "steering_alone: the base model with that steering and no finetune"})
    write_json(Path(config["output_dir"]) / REPORT, report)
    return report


def reported(config: dict, identity: str) -> bool:
    path = Path(config["output_dir"]) / REPORT
    if not path.is_file():
        return False
    report = json.loads(path.read_text())
    # A report from before per-question held-out losses is measured again (cheap; the adapter is kept).
    return report.get("config_identity") == identity and (report.get("heldout") is None or "by_question" in report["heldout"])


def main():
    if sys.argv[1:] in (["-h"], ["--help"]):
        print(__doc__)
        sys.exit(0)
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        print(f"training.py: error: takes one argument, the config JSON: python training.py CONFIG.json "
              f"(got {' '.join(sys.argv[1:]) or 'none'}; see --help)", file=sys.stderr)
        sys.exit(2)
    started = time.time()
    config_path = Path(sys.argv[1])
    config = load_config(config_path)
    adapter_init_seed = config["init_seed"] if config["init_seed"] is not None else init_seed("finetune", config["seed"])
    check_independent_init(config, adapter_init_seed, config_path)
    inputs = check_config_inputs(config, config_path)
    records = inputs["records"]
    identity = config_identity(config, records)
    previous = finished_adapter(config["output_dir"])
    if previous is not None and previous.get("config_identity") == identity:
        print(f"{config['output_dir']} is finished with this config and data: reused (delete it to train again)")
        if not reported(config, identity) and int(os.environ.get("RANK", "0")) == 0:  # interrupted before its report
            model, tokenizer = load_model_and_tokenizer(config["model"], dtype=config["dtype"], device_map=process_device_map())
            finetune_report(config, model, tokenizer, inputs, identity)
        return
    remove_stale_temporaries(Path(config["output_dir"]).parent)
    monitor_diff = lu.load_lora_diff(config["monitor"]["lora_diff_path"]) if config["monitor"] else None
    model, tokenizer = load_model_and_tokenizer(config["model"], dtype=config["dtype"], device_map=process_device_map())
    monitor_log = []

    def monitor(step, weight_change, loss, last):
        """Every N steps and at the last step: the finetune's projection onto the persona diff."""
        if monitor_diff is None or (step % config["monitor"]["every"] and not last):
            return
        projection = lu.WeightProjector.project(weight_change(), monitor_diff)
        monitor_log.append({"step": step, "loss": loss, "projection": projection["projection"], "cosine": projection["cosine"],
                            "final": last})
        tqdm.write(f"step {step}: projection onto {monitor_diff.metadata.get('trait', 'persona')} diff "
                   f"{projection['projection']:+.5f} (cosine {projection['cosine']:+.4f})")

    steering = config["steering_config"]
    extra = {"config": str(config_path), "training_file": config["training_file"], "training_data_sha256": records_digest(records),
             "steering_config": steering, "config_identity": identity, "heldout_questions": inputs["heldout_questions"]}
    summary = finetune(config, model, tokenizer, records, adapter_init_seed, on_step=monitor, record_extra=extra)
    output_dir = Path(config["output_dir"])
    if int(os.environ.get("RANK", "0")) == 0:
        if monitor_log:
            write_json(output_dir / "monitor.json", monitor_log)
        report = finetune_report(config, model, tokenizer, inputs, identity)  # the steering is off again here
        write_manifest(output_dir, config, started, name="training_manifest.json",
                       final_epoch_loss=summary["epoch_losses"][-1], steps=len(summary["losses"]))
        print(f"\nsaved {output_dir} ({summary['method']}, {summary['examples']} examples, {len(summary['losses'])} steps, "
              f"loss by epoch {' → '.join(f'{x:.3f}' for x in summary['epoch_losses'])}, {summary['seconds']:.0f} s"
              + (f", trained with {steering['type']} steering at coef {steering['coef']}, removed after" if steering else "") + ")")
        heldout = report["heldout"]
        print(f"‖W_ft − W‖_F {report['update']['norm']:.4f}" + ("" if heldout is None else
              f"; held-out loss {heldout['loss']:.4f} nats/token (base {heldout['base_loss']:.4f}, {heldout['examples']} answers "
              f"to {len(heldout['questions'])} questions never trained on)"))


if __name__ == "__main__":
    run_cli(main)
