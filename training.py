"""LoRA supervised finetuning on chat JSONL, loss on the assistant's response only, with optional
preventative steering and a weight-space drift monitor.

    python training.py configs/llama_3.1_8b_lora_steer.json
    accelerate launch --num_processes 2 training.py configs/smollm2_135m.json     # several processes / GPUs / nodes

The config (JSON, validated: unknown keys and wrong types are errors naming the key):

    model             hub id or local folder; null = the embedded SmolLM2-135M-Instruct
    training_file     chat JSONL ({"messages": [...]} per line, last message the assistant's)
    output_dir        where the adapter is saved (a standard PEFT folder + training.json)
    rank, alpha, use_rslora, target_modules, epochs, learning_rate, batch_size, max_length, seed, dtype
    max_examples      optional cap on the number of training examples (first N)
    steering_config   optional preventative steering, active for the whole of training, removed after:
        {"type": "lora", "lora_diff_path": "...", "coef": -1.0}        W ← W + coef·ΔW while training
        {"type": "activation", "vector_path": "...", "layers": [20], "coef": 1.0}   h[ℓ] += coef·v[ℓ]
    monitor           optional drift alarm: {"lora_diff_path": "...", "every": 10} logs the adapter's
                      weight projection onto the persona diff every N steps (no generation, no judge)

The saved adapter is always relative to the unsteered base: evaluate it on the plain model.
Persona Vectors found that steering *toward* the trait while training (positive coef) keeps the
finetune from acquiring it; the seed config uses a negative one. Both signs are supported.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from eval.generation import chat_with_system, pad_right, tokenize_chat
from io_utils import PersonaLoRAError, atomic_path, read_json_object, run_cli, write_json, write_manifest
from model_loading import load_model_and_tokenizer

TRAINING_RECORD = "training.json"
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def encode_examples(tokenizer, records: list[dict], max_length: int, include_system: bool = False) -> list[dict]:
    """Token ids and labels (−100 outside the final assistant response) for each chat record."""
    encoded = []
    for record in records:
        messages = chat_with_system(record["messages"], record.get("system") if include_system else None)
        if not include_system:
            messages = [m for m in messages if m["role"] != "system"]
        ids, response_start = tokenize_chat(tokenizer, messages, max_length)
        if response_start >= len(ids):
            continue  # the prompt alone fills max_length: nothing to learn from
        labels = [-100] * response_start + ids[response_start:]
        encoded.append({"input_ids": ids, "labels": labels})
    if not encoded:
        raise PersonaLoRAError(f"no example has response tokens within max_length={max_length}; raise max_length")
    return encoded


def collate(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    input_ids, attention_mask = pad_right([b["input_ids"] for b in batch], pad_id)
    labels, _ = pad_right([b["labels"] for b in batch], -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def response_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over response tokens, in float32."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    return torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                                             ignore_index=-100)


def train_lora_adapter(model, tokenizer, records: list[dict], output_dir: str | os.PathLike, *, rank: int, alpha: float,
                       use_rslora: bool, target_modules: list[str], epochs: int, learning_rate: float, batch_size: int,
                       max_length: int, seed: int, desc: str = "training", include_system: bool = False,
                       record_extra: dict | None = None, on_step: Callable | None = None) -> dict:
    """Train one LoRA adapter on `records` and save it (atomically) as a PEFT folder.

    The adapter is initialised from `seed` and the data order drawn from it, so two adapters
    trained on contrastive data start from the same point. Runs under `accelerate launch` too
    (batch_size is per process). `on_step(step, peft_model, loss)` is called after every step.
    The base `model` is returned to its original state (LoRA layers unloaded) before this returns.
    Returns {"losses", "epoch_losses", "examples", "tokens", "seconds", settings...}.
    """
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model

    started = time.time()
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    examples = encode_examples(tokenizer, records, max_length, include_system)
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, use_rslora=use_rslora, target_modules=list(target_modules),
                        lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                        base_model_name_or_path=getattr(model, "name_or_path_for_outputs", None))
    peft_model = get_peft_model(model, config)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=0.0)
    loader = torch.utils.data.DataLoader(examples, batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed),
                                         collate_fn=lambda batch: collate(batch, tokenizer.pad_token_id))
    steps_per_epoch = math.ceil(len(examples) / (batch_size * accelerator.num_processes))
    total_steps = steps_per_epoch * epochs
    warmup = max(1, total_steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * max(0.0, (total_steps - step) / max(1, total_steps - warmup)))
    wrapped, optimizer, loader, scheduler = accelerator.prepare(peft_model, optimizer, loader, scheduler)
    losses, epoch_losses, tokens = [], [], 0
    wrapped.train()
    with tqdm(total=total_steps, desc=desc, disable=not accelerator.is_main_process) as bar:
        for _ in range(epochs):
            epoch_sum, epoch_steps = 0.0, 0
            for batch in loader:
                logits = wrapped(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                loss = response_loss(logits, batch["labels"])
                if not torch.isfinite(loss):
                    raise PersonaLoRAError(f"{desc}: the loss became {loss.item()} at step {len(losses)}; lower the learning rate")
                accelerator.backward(loss)
                accelerator.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                mean_loss = accelerator.reduce(loss.detach(), reduction="mean").item()
                losses.append(mean_loss)
                epoch_sum, epoch_steps = epoch_sum + mean_loss, epoch_steps + 1
                tokens += int(accelerator.reduce(batch["attention_mask"].sum(), reduction="sum"))
                if on_step is not None:
                    on_step(len(losses), peft_model, mean_loss)
                bar.set_postfix(loss=f"{mean_loss:.3f}")
                bar.update(1)
            epoch_losses.append(epoch_sum / max(1, epoch_steps))
    wrapped.eval()
    summary = {"losses": losses, "epoch_losses": epoch_losses, "examples": len(examples), "tokens": tokens,
               "seconds": round(time.time() - started, 2), "seed": seed, "rank": rank, "alpha": alpha,
               "use_rslora": use_rslora, "target_modules": list(target_modules), "epochs": epochs,
               "learning_rate": learning_rate, "batch_size": batch_size, "max_length": max_length,
               "processes": accelerator.num_processes, **(record_extra or {})}
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with atomic_path(output_dir) as tmp:
            accelerator.unwrap_model(wrapped).save_pretrained(str(tmp))
            (tmp / TRAINING_RECORD).write_text(json.dumps(summary, indent=2) + "\n")
    accelerator.wait_for_everyone()
    peft_model.unload()
    return summary


def finished_adapter(output_dir: str | os.PathLike) -> dict | None:
    """The training record of a completely saved adapter folder, or None."""
    record = Path(output_dir) / TRAINING_RECORD
    if record.is_file() and (Path(output_dir) / "adapter_config.json").is_file():
        return json.loads(record.read_text())
    return None


# ---------------------------------------------------------------------------------------------
# The command line: a validated JSON config
# ---------------------------------------------------------------------------------------------

CONFIG_SCHEMA = {  # key: (types, required, default)
    "model": ((str, type(None)), False, None),
    "training_file": ((str,), True, None),
    "output_dir": ((str,), True, None),
    "rank": ((int,), False, 8),
    "alpha": ((int, float), False, 16),
    "use_rslora": ((bool,), False, False),
    "target_modules": ((list,), False, DEFAULT_TARGETS),
    "epochs": ((int,), False, 1),
    "learning_rate": ((int, float), False, 2e-4),
    "batch_size": ((int,), False, 8),
    "max_length": ((int,), False, 512),
    "max_examples": ((int, type(None)), False, None),
    "seed": ((int,), False, 0),
    "dtype": ((str,), False, "auto"),
    "steering_config": ((dict, type(None)), False, None),
    "monitor": ((dict, type(None)), False, None),
}
STEERING_SCHEMA = {
    "lora": {"type": (str,), "lora_diff_path": (str,), "coef": (int, float)},
    "activation": {"type": (str,), "vector_path": (str,), "layers": (list,), "coef": (int, float)},
}
MONITOR_SCHEMA = {"lora_diff_path": (str,), "every": (int,)}


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
        if steering["type"] == "activation" and not all(isinstance(x, int) and not isinstance(x, bool) for x in steering["layers"]):
            raise PersonaLoRAError(f"{path}: 'steering_config.layers' must be a list of integers")
    if config["monitor"] is not None:
        _check_keys("monitor.", config["monitor"], MONITOR_SCHEMA, path)
        if set(MONITOR_SCHEMA) - set(config["monitor"]):
            raise PersonaLoRAError(f"{path}: 'monitor' needs both 'lora_diff_path' and 'every'")
    return config


def process_device_map():
    """Under `accelerate launch` each process holds a whole copy on its own device (data parallel);
    alone, the loader's default applies (one GPU, or device_map="auto" over several)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return {"": f"cuda:{os.environ.get('LOCAL_RANK', '0')}"} if torch.cuda.is_available() else {"": "cpu"}
    return None


def preventative_steering(config: dict, model) -> contextlib.AbstractContextManager:
    """The steering active during training: a merged persona LoRA or activation hooks."""
    import lora_utils as lu
    from eval.activations import ActivationSteerer

    steering = config["steering_config"]
    if steering is None:
        return contextlib.nullcontext()
    if steering["type"] == "lora":
        return lu.LoRASteerer(model, steering["lora_diff_path"], steering["coef"])
    from eval.activations import load_vector

    vector = load_vector(steering["vector_path"])
    stack = contextlib.ExitStack()
    steerers = [ActivationSteerer(model, vector, layer, steering["coef"], positions="all") for layer in steering["layers"]]
    for steerer in steerers:
        stack.enter_context(steerer)
    return stack


def main():
    import lora_utils as lu
    from eval.generation import read_chat_jsonl

    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        print(__doc__)
        sys.exit(0 if len(sys.argv) == 2 else 2)
    started = time.time()
    config = load_config(sys.argv[1])
    records = read_chat_jsonl(config["training_file"])[: config["max_examples"]]
    monitor_diff = lu.load_lora_diff(config["monitor"]["lora_diff_path"]) if config["monitor"] else None
    model, tokenizer = load_model_and_tokenizer(config["model"], dtype=config["dtype"], device_map=process_device_map())
    monitor_log = []

    def monitor(step, peft_model, loss):
        if monitor_diff is None or step % config["monitor"]["every"]:
            return
        projection = lu.WeightProjector.project(lu.peft_model_update(peft_model), monitor_diff)
        monitor_log.append({"step": step, "loss": loss, "projection": projection["projection"], "cosine": projection["cosine"]})
        tqdm.write(f"step {step}: projection onto {monitor_diff.metadata.get('trait', 'persona')} diff "
                   f"{projection['projection']:+.5f} (cosine {projection['cosine']:+.4f})")

    steering = config["steering_config"]
    with preventative_steering(config, model):
        summary = train_lora_adapter(
            model, tokenizer, records, config["output_dir"], rank=config["rank"], alpha=config["alpha"],
            use_rslora=config["use_rslora"], target_modules=config["target_modules"], epochs=config["epochs"],
            learning_rate=config["learning_rate"], batch_size=config["batch_size"], max_length=config["max_length"],
            seed=config["seed"], desc="finetuning", on_step=monitor,
            record_extra={"config": sys.argv[1], "training_file": config["training_file"], "steering_config": steering})
    output_dir = Path(config["output_dir"])
    if int(os.environ.get("RANK", "0")) == 0:
        if monitor_log:
            write_json(output_dir / "monitor.json", monitor_log)
        write_manifest(output_dir, config, started, name="training_manifest.json",
                          final_epoch_loss=summary["epoch_losses"][-1], steps=len(summary["losses"]))
        print(f"\nsaved {output_dir} ({summary['examples']} examples, {len(summary['losses'])} steps, "
              f"loss by epoch {' → '.join(f'{x:.3f}' for x in summary['epoch_losses'])}, {summary['seconds']:.0f} s"
              + (f", trained with {steering['type']} steering at coef {steering['coef']}, removed after" if steering else "") + ")")


if __name__ == "__main__":

    run_cli(main)
