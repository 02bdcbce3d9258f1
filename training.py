"""LoRA supervised finetuning on chat data, loss on the assistant's response tokens only.

`train_lora_adapter` is the one training loop of the project: extract_persona_lora.py trains the
pos/neg persona adapters with it.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from eval.generation import chat_with_system, pad_right, tokenize_chat
from lora_utils import PersonaLoRAError, atomic_path

TRAINING_RECORD = "training.json"


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
        raise PersonaLoRAError(f"no example has response tokens within max_length={max_length}; raise --max_length")
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
                       record_extra: dict | None = None) -> dict:
    """Train one LoRA adapter on `records` and save it (atomically) as a PEFT folder.

    The adapter is initialised from `seed`, and the data order is drawn from `seed` too, so two
    adapters trained on contrastive data start from the same point. The base `model` is returned
    to its original state (the LoRA layers are unloaded) before this returns.
    Returns {"losses": per-step losses, "epoch_losses", "examples", "tokens", "seconds"}.
    """
    from peft import LoraConfig, get_peft_model

    started = time.time()
    examples = encode_examples(tokenizer, records, max_length, include_system)
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, use_rslora=use_rslora, target_modules=list(target_modules),
                        lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                        base_model_name_or_path=getattr(model, "name_or_path_for_outputs", None))
    peft_model = get_peft_model(model, config)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(examples) / batch_size)
    total_steps = steps_per_epoch * epochs
    warmup = max(1, total_steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * max(0.0, (total_steps - step) / max(1, total_steps - warmup)))
    device = next(p for p in peft_model.parameters() if p.requires_grad).device
    order_rng = random.Random(seed)
    losses, epoch_losses, tokens = [], [], 0
    peft_model.train()
    with tqdm(total=total_steps, desc=desc) as bar:
        for _ in range(epochs):
            order = list(range(len(examples)))
            order_rng.shuffle(order)
            epoch_sum = 0.0
            for start in range(0, len(order), batch_size):
                batch = collate([examples[i] for i in order[start:start + batch_size]], tokenizer.pad_token_id)
                batch = {k: v.to(device) for k, v in batch.items()}
                logits = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                loss = response_loss(logits, batch["labels"])
                if not torch.isfinite(loss):
                    raise PersonaLoRAError(f"{desc}: the loss became {loss.item()} at step {len(losses)}; lower the learning rate")
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                epoch_sum += loss.item()
                tokens += int(batch["attention_mask"].sum())
                bar.set_postfix(loss=f"{loss.item():.3f}")
                bar.update(1)
            epoch_losses.append(epoch_sum / steps_per_epoch)
    peft_model.eval()
    summary = {"losses": losses, "epoch_losses": epoch_losses, "examples": len(examples), "tokens": tokens,
               "seconds": round(time.time() - started, 2), "seed": seed, "rank": rank, "alpha": alpha,
               "use_rslora": use_rslora, "target_modules": list(target_modules), "epochs": epochs,
               "learning_rate": learning_rate, "batch_size": batch_size, "max_length": max_length, **(record_extra or {})}
    with atomic_path(output_dir) as tmp:
        peft_model.save_pretrained(str(tmp))
        (tmp / TRAINING_RECORD).write_text(json.dumps(summary, indent=2) + "\n")
    peft_model.unload()
    return summary


def finished_adapter(output_dir: str | os.PathLike) -> dict | None:
    """The training record of a completely saved adapter folder, or None."""
    record = Path(output_dir) / TRAINING_RECORD
    if record.is_file() and (Path(output_dir) / "adapter_config.json").is_file():
        return json.loads(record.read_text())
    return None
