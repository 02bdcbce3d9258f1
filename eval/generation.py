"""Batched, seeded, resumable chat generation, and chat tokenisation with response masks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from io_utils import PersonaLoRAError, read_jsonl, write_jsonl
from model_loading import model_device


def read_chat_jsonl(path: str | os.PathLike) -> list[dict]:
    """Chat JSONL as in Persona Vectors' dataset.zip: {"messages": [{"role", "content"}, ...]} per line,
    the last message the assistant's. An optional "system" string is kept beside the messages."""
    records = read_jsonl(path)
    if not records:
        raise PersonaLoRAError(f"{path} holds no examples")
    for number, record in enumerate(records, 1):
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages):
            raise PersonaLoRAError(f"{path}:{number}: expected {{\"messages\": [{{\"role\": ..., \"content\": ...}}, ...]}}")
        if messages[-1]["role"] != "assistant":
            raise PersonaLoRAError(f"{path}:{number}: the last message must be the assistant's response")
    return records


def chat_with_system(messages: list[dict], system: str | None) -> list[dict]:
    if system:
        return [{"role": "system", "content": system}, *[m for m in messages if m["role"] != "system"]]
    return list(messages)


def tokenize_chat(tokenizer, messages: list[dict], max_length: int | None = None) -> tuple[list[int], int]:
    """Token ids of a whole conversation and the index where the final assistant response starts."""
    prompt_ids = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True)
    full_ids = tokenizer.apply_chat_template(messages, tokenize=True)
    prompt_ids = prompt_ids["input_ids"] if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "keys") else prompt_ids
    full_ids = full_ids["input_ids"] if isinstance(full_ids, dict) or hasattr(full_ids, "keys") else full_ids
    if list(full_ids[: len(prompt_ids)]) != list(prompt_ids):
        raise PersonaLoRAError("the chat template renders the prompt differently with and without the response; "
                               "cannot locate the response tokens for this tokenizer")
    if max_length is not None:
        full_ids = full_ids[:max_length]
    return list(full_ids), len(prompt_ids)


def pad_right(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right padding, so positions start at 0 for every row in plain forward passes."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        mask[row, : len(sequence)] = 1
    return ids, mask


@torch.no_grad()
def response_log_likelihoods(model, tokenizer, conversations: list[list[dict]], batch_size: int = 8,
                             max_length: int | None = None) -> list[float]:
    """Per conversation, the mean log-probability (nats per token) the model gives its final
    assistant response, given everything before it: teacher-forced, no sampling."""
    spans = [tokenize_chat(tokenizer, c, max_length) for c in conversations]
    scores = []
    for start in range(0, len(spans), batch_size):
        chunk = spans[start:start + batch_size]
        input_ids, attention_mask = pad_right([ids for ids, _ in chunk], tokenizer.pad_token_id)
        input_ids = input_ids.to(model_device(model))
        logits = model(input_ids=input_ids, attention_mask=attention_mask.to(input_ids.device)).logits
        for row, (ids, response_start) in enumerate(chunk):
            # Token t is predicted at position t−1; only the response's tokens count.
            predicted = logits[row, response_start - 1:len(ids) - 1].float().log_softmax(-1)
            targets = input_ids[row, response_start:len(ids)]
            scores.append(float(predicted.gather(1, targets[:, None]).mean()) if len(targets) else float("nan"))
    return scores


@torch.no_grad()
def generate_batch(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int, temperature: float,
                   top_p: float = 1.0, seed: int | None = None) -> list[str]:
    """Answers to a batch of conversations (each ending with a user turn), left-padded."""
    prompts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model_device(model))
    if seed is not None:
        torch.manual_seed(seed)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling)
    return tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def generate_records(model, tokenizer, jobs: list[dict], output_path: str | os.PathLike, *, max_new_tokens: int,
                     temperature: float, top_p: float = 1.0, batch_size: int = 32, seed: int = 0,
                     desc: str = "generating") -> list[dict]:
    """Answer every job ({"id", "system", "messages": [..., user turn], ...}) and write JSONL records
    with the answer appended as an assistant message.

    Finished batches are appended to `<output>.partial` as they complete, so an interrupted run
    resumes where it stopped; the final file appears (renamed) only when every job is done.
    Batches are fixed by the job order and each is seeded with seed + its index, so a resumed run
    samples what an uninterrupted one would.
    """
    output_path = Path(output_path)
    partial_path = output_path.with_name(output_path.name + ".partial")
    done = {}
    if partial_path.is_file():
        for line in partial_path.read_text().splitlines():
            try:
                record = json.loads(line)
                done[record["id"]] = record
            except (json.JSONDecodeError, KeyError):
                continue  # the torn last line of an interrupted write
    order = sorted(range(len(jobs)), key=lambda i: len(str(jobs[i]["messages"])) + len(jobs[i].get("system") or ""))
    batches = [[jobs[i] for i in order[start:start + batch_size]] for start in range(0, len(order), batch_size)]
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with partial_path.open("a") as sink, tqdm(total=len(jobs), desc=desc, initial=sum(j["id"] in done for j in jobs)) as bar:
        for index, batch in enumerate(batches):
            if all(job["id"] in done for job in batch):
                continue
            answers = generate_batch(model, tokenizer, [chat_with_system(j["messages"], j.get("system")) for j in batch],
                                     max_new_tokens, temperature, top_p, seed=seed + index)
            for job, answer in zip(batch, answers):
                record = {**job, "messages": [*job["messages"], {"role": "assistant", "content": answer.strip()}]}
                done[job["id"]] = record
                sink.write(json.dumps(record) + "\n")
            sink.flush()
            bar.update(sum(1 for job in batch))
    records = [done[job["id"]] for job in jobs]
    write_jsonl(output_path, records)
    partial_path.unlink(missing_ok=True)
    return records
