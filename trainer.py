"""Training as a library: LoRA adapters and dense finetunes by supervised finetuning on chat
records (loss on the final assistant response only), with the initialisation-seed streams that keep
a finetune from starting where the persona adapters started.

Used by extract_persona_lora.py (the pos/neg persona adapters), training.py (finetunes, with
preventative steering), distill_steering_lora.py and the tests. Nothing here parses flags.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

import lora_utils as lu
from eval.generation import conversation, pad_right, tokenize_chat
from eval.traits import normalize_question
from io_utils import STAGES, PersonaLoRAError, atomic_path

TRAINING_RECORD = "training.json"
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def init_seed(purpose: str, seed: int) -> int:
    """Adapter initialisation seeds come from one stream per purpose ("persona" for the pos/neg
    persona adapters, which share theirs by design; "finetune" for everything compared with them).
    Two LoRAs started from the same lora_A share a row space, and their inner product is then large
    whatever they learned: a finetune must never start where the persona adapters started."""
    return int.from_bytes(hashlib.sha256(f"{purpose}:{seed}".encode()).digest()[:4], "little")


def run_seed(name: str, seed: int = 0) -> int:
    """A finetune's own training seed (its initialisation, through init_seed("finetune", ·), and its
    data order), derived from its run name and the series' seed: every finetune of a series starts
    from its own lora_A and sees its own data order, and rerunning the series gives each the same
    seed again. Finetunes sharing one seed would share their initialisation, so their projections
    and behaviours would not be independent points."""
    return int.from_bytes(hashlib.sha256(f"run:{seed}:{name}".encode()).digest()[:4], "little") % 2**31


def encode_examples(tokenizer, records: list[dict], max_length: int) -> list[dict]:
    """Token ids and labels (−100 outside the final assistant response) for each chat record,
    without its system prompt or demonstrations: the question and the answer only."""
    encoded, dropped, cut = [], 0, 0
    for record in records:
        whole, response_start, _ = tokenize_chat(tokenizer, conversation(record, with_context=False))
        ids = whole[:max_length]
        if response_start >= len(ids):
            dropped += 1  # the prompt alone fills max_length: nothing to learn from
            continue
        cut += len(whole) > max_length
        labels = [-100] * response_start + ids[response_start:]
        encoded.append({"input_ids": ids, "labels": labels, "question": question_of(record)})
    if not encoded:
        raise PersonaLoRAError(f"no example has response tokens within max_length={max_length}; raise max_length")
    if dropped or cut:  # said, not silent: a finetune of fewer or shorter examples than its file is another finetune
        print(f"warning: of {len(records)} examples, {dropped} dropped (the prompt alone fills max_length={max_length}) and "
              f"{cut} with the answer cut at it; raise max_length to keep them whole", file=sys.stderr)
    return encoded


def question_of(record: dict) -> str:
    return next(m["content"] for m in record["messages"] if m["role"] == "user").strip()


def split_heldout(records: list[dict], n_questions: int) -> tuple[list[dict], list[dict], list[str]]:
    """(training records, held-out records, held-out questions): every answer to `n_questions` of
    the file's questions is held out, so no held-out question was trained on in any form. The
    questions are those whose normalised text hashes lowest: independent of the file's order, the
    seed and the answers, so every finetune on answers to the same questions (a prevention sweep,
    its control on other answers) holds out the same questions."""
    questions = sorted({normalize_question(question_of(r)) for r in records},
                       key=lambda q: hashlib.sha256(q.encode()).hexdigest())
    if n_questions and n_questions >= len(questions):
        raise PersonaLoRAError(f"holding out {n_questions} questions leaves none of the {len(questions)} to train on")
    heldout = set(questions[:n_questions])
    trained = [r for r in records if normalize_question(question_of(r)) not in heldout]
    kept_out = [r for r in records if normalize_question(question_of(r)) in heldout]
    return trained, kept_out, sorted({question_of(r) for r in kept_out})


def mean_response_loss(model, examples: list[dict], pad_id: int, batch_size: int = 8) -> dict:
    """Next-token cross-entropy over the response tokens of encode_examples' examples (question →
    answer, no system prompt or demonstrations, as trained; encoded once by the caller however many
    models it scores), averaged over tokens: {"loss", "tokens", "examples", "by_question"};
    by_question averages each question's own answers' tokens, the unit a paired comparison of two
    models on the same answers needs (a question's answers are not independent)."""
    device = next(model.parameters()).device
    sums: dict[str, list[float]] = {}
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
            logits, labels = response_logits(model, batch)
            per_token = response_loss(logits, labels, reduction="none").view(len(chunk), -1)
            counts = (labels[:, 1:] != -100).sum(1)
            for example, loss, count in zip(chunk, per_token.sum(1).tolist(), counts.tolist()):
                total = sums.setdefault(example["question"], [0.0, 0])
                total[0] += loss
                total[1] += count
    tokens = sum(count for _, count in sums.values())
    return {"loss": sum(loss for loss, _ in sums.values()) / tokens, "tokens": tokens, "examples": len(examples),
            "by_question": {question: loss / count for question, (loss, count) in sums.items()}}


def collate(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    input_ids, attention_mask = pad_right([b["input_ids"] for b in batch], pad_id)
    labels, _ = pad_right([b["labels"] for b in batch], -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def response_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's logits from the position before its first response token on, and the labels
    aligned with them (for response_loss). The prompt positions carry no loss, so their vocabulary
    projections are not computed."""
    labelled = (batch["labels"] != -100).any(0).nonzero()
    first = max(0, int(labelled[0]) - 1) if len(labelled) else batch["labels"].shape[1] - 1
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   logits_to_keep=batch["input_ids"].shape[1] - first).logits
    return logits, batch["labels"][:, first:]


def response_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy over response tokens, in float32: their mean (training), sum, or
    each position's ("none"; 0 where nothing is scored), as mean_response_loss needs them."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    return torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                                             ignore_index=-100, reduction=reduction)


def _train_loop(accelerator, trainable_model, trainable, examples, pad_id: int, *, epochs: int, learning_rate: float,
                batch_size: int, seed: int, desc: str, on_step: Callable | None) -> tuple[list[float], list[float], int]:
    """AdamW with warm-up and linear decay, gradient clipping at 1; the data order drawn from `seed`."""
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=0.0)
    loader = torch.utils.data.DataLoader(examples, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed),
                                         collate_fn=lambda batch: collate(batch, pad_id))
    steps_per_epoch = math.ceil(len(examples) / (batch_size * accelerator.num_processes))
    total_steps = steps_per_epoch * epochs
    warmup = max(1, total_steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * max(0.0, (total_steps - step) / max(1, total_steps - warmup)))
    wrapped, optimizer, loader, scheduler = accelerator.prepare(trainable_model, optimizer, loader, scheduler)
    losses, epoch_losses, tokens = [], [], 0
    wrapped.train()
    with tqdm(total=total_steps, desc=desc, disable=not accelerator.is_main_process) as bar, \
            STAGES.stage(desc, "tokens") as work:
        for _ in range(epochs):
            epoch_sum, epoch_steps = 0.0, 0
            for batch in loader:
                loss = response_loss(*response_logits(wrapped, batch))
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
                work["count"] = tokens
                if on_step is not None:
                    on_step(len(losses), mean_loss, len(losses) == total_steps)
                bar.set_postfix(loss=f"{mean_loss:.3f}")
                bar.update(1)
            epoch_losses.append(epoch_sum / max(1, epoch_steps))
    wrapped.eval()
    return losses, epoch_losses, tokens


def train_lora_adapter(model, tokenizer, records: list[dict], output_dir: str | os.PathLike, *, rank: int, alpha: float,
                       use_rslora: bool, target_modules: list[str], epochs: int, learning_rate: float, batch_size: int,
                       max_length: int, seed: int, adapter_init_seed: int, base_model_name: str | None = None,
                       desc: str = "training", record_extra: dict | None = None, on_step: Callable | None = None) -> dict:
    """Train one LoRA adapter on `records` (question → answer) and save it atomically as a PEFT folder.

    The adapter's lora_A is initialised from `adapter_init_seed` (see init_seed), the data order
    drawn from `seed`. Runs under `accelerate launch` too (batch_size is per process).
    `on_step(step, update, loss, last)` may ask for the adapter's current exact update after every
    step (`update` is a function, so steps that do not need it cost nothing).
    The base `model` is returned to its original state (LoRA layers unloaded) before this returns.
    Returns {"losses", "epoch_losses", "examples", "tokens", "seconds", settings...}.
    """
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model

    started = time.time()
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    examples = encode_examples(tokenizer, records, max_length)
    torch.manual_seed(adapter_init_seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, use_rslora=use_rslora, target_modules=list(target_modules),
                        lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base_model_name)
    peft_model = get_peft_model(model, config)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    step_hook = (lambda step, loss, last: on_step(step, lambda: lu.peft_model_update(peft_model), loss, last)) if on_step else None
    try:
        losses, epoch_losses, tokens = _train_loop(accelerator, peft_model, trainable, examples, tokenizer.pad_token_id,
                                                   epochs=epochs, learning_rate=learning_rate, batch_size=batch_size, seed=seed,
                                                   desc=desc, on_step=step_hook)
        summary = {"method": "lora", "losses": losses, "epoch_losses": epoch_losses, "examples": len(examples), "tokens": tokens,
                   "seconds": round(time.time() - started, 2), "seed": seed, "init_seed": adapter_init_seed, "rank": rank,
                   "alpha": alpha, "use_rslora": use_rslora, "target_modules": list(target_modules), "epochs": epochs,
                   "learning_rate": learning_rate, "batch_size": batch_size, "max_length": max_length,
                   "processes": accelerator.num_processes, **(record_extra or {})}
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            with atomic_path(output_dir) as tmp:
                peft_model.save_pretrained(str(tmp))
                (tmp / TRAINING_RECORD).write_text(json.dumps(summary, indent=2) + "\n")
        accelerator.wait_for_everyone()
    finally:
        peft_model.unload()
    return summary


def target_parameters(model, target_modules: list[str]) -> dict[str, torch.nn.Parameter]:
    """The weights of the linear modules named by `target_modules` (their last name part)."""
    params = {name: p for name, p in model.named_parameters()
              if name.endswith(".weight") and lu.module_type(name) in set(target_modules) and p.ndim == 2}
    if not params:
        raise PersonaLoRAError(f"no weight of the model matches target_modules {target_modules}")
    return params


def train_dense(model, tokenizer, records: list[dict], output_dir: str | os.PathLike, *, target_modules: list[str], epochs: int,
                learning_rate: float, batch_size: int, max_length: int, seed: int, desc: str = "training (dense)",
                record_extra: dict | None = None, on_step: Callable | None = None) -> dict:
    """Train every weight of the target modules (nothing else) and save the whole model as a full
    checkpoint. `on_step(step, changes, loss, last)` may ask for {param name: W − W₀} (`changes` is
    a function) after every step. The
    model's weights are restored afterwards, so the caller's model is the base model again."""
    from accelerate import Accelerator

    started = time.time()
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    examples = encode_examples(tokenizer, records, max_length)
    params = target_parameters(model, target_modules)
    originals = {name: p.detach().clone() for name, p in params.items()}
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)

    def changes():
        return {name: (p.detach() - originals[name]) for name, p in params.items()}

    step_hook = (lambda step, loss, last: on_step(step, changes, loss, last)) if on_step else None
    try:
        losses, epoch_losses, tokens = _train_loop(accelerator, model, list(params.values()), examples, tokenizer.pad_token_id,
                                                   epochs=epochs, learning_rate=learning_rate, batch_size=batch_size, seed=seed,
                                                   desc=desc, on_step=step_hook)
        summary = {"method": "dense", "losses": losses, "epoch_losses": epoch_losses, "examples": len(examples), "tokens": tokens,
                   "seconds": round(time.time() - started, 2), "seed": seed, "target_modules": list(target_modules),
                   "trained_parameters": sum(p.numel() for p in params.values()), "epochs": epochs,
                   "learning_rate": learning_rate, "batch_size": batch_size, "max_length": max_length,
                   "processes": accelerator.num_processes, **(record_extra or {})}
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            with atomic_path(output_dir) as tmp:
                accelerator.unwrap_model(model).save_pretrained(str(tmp))
                (tmp / TRAINING_RECORD).write_text(json.dumps(summary, indent=2) + "\n")
        accelerator.wait_for_everyone()
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(originals[name])
        for p in model.parameters():
            p.requires_grad_(False)
        for p in frozen:
            p.requires_grad_(True)
        model.eval()
    return summary


def update_norms(model, folder: str | os.PathLike) -> dict:
    """The Frobenius norm of a saved finetune's weight change W_ft − W: a LoRA adapter's exact update
    s·B·A (from its factors), a full checkpoint's changed tensors minus the base `model`'s. "norm" is
    one Frobenius norm over the whole update, √(Σ over modules ‖ΔW_m‖²_F); "by_type" the same over
    the modules of each type (q_proj, ..., down_proj)."""
    squares: dict[str, float] = {}
    if (Path(folder) / "adapter_config.json").is_file():
        update = lu.load_adapter_update(folder)
        for name in update:
            squares[lu.module_type(name)] = squares.get(lu.module_type(name), 0.0) + update.module_sq_norm(name)
    else:
        checkpoint, params = lu.SafetensorsCheckpoint(Path(folder)), dict(model.named_parameters())
        for name in checkpoint.weight_map:
            if name in params:
                change = checkpoint.tensor(name).to(torch.float64) - params[name].detach().to("cpu", torch.float64)
                squares[lu.module_type(name)] = squares.get(lu.module_type(name), 0.0) + float(change.pow(2).sum())
    return {"norm": math.sqrt(sum(squares.values())), "by_type": {kind: math.sqrt(value) for kind, value in squares.items()},
            "kind": "Frobenius norm of the whole weight change: √(Σ over modules ‖ΔW_m‖²_F); by_type: over each module type"}


def finished_adapter(output_dir: str | os.PathLike) -> dict | None:
    """The training record of a completely saved finetune folder (adapter or checkpoint), or None.
    The record is written inside the same atomic folder as the weights, so its presence means the
    weights are complete."""
    folder = Path(output_dir)
    record = folder / TRAINING_RECORD
    weights = (folder / "adapter_config.json").is_file() or (folder / "config.json").is_file()
    if record.is_file() and weights:
        try:
            return json.loads(record.read_text())
        except ValueError:
            return None
    return None


# ---------------------------------------------------------------------------------------------
# The command line: a validated JSON config
# ---------------------------------------------------------------------------------------------


def records_digest(records: list[dict]) -> str:
    """The training examples' content, whatever file they came from: finetunes with equal digests
    are replicates of one dataset (the projection's correlation pools them)."""
    return hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()
