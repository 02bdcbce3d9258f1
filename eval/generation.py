"""Batched, seeded, resumable chat generation; conversations with system prompts and few-shot
demonstrations; chat tokenisation with the answer's token span; teacher-forced log-likelihoods."""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from io_utils import STAGES, PersonaLoRAError, read_jsonl, write_json, write_jsonl
from model_loading import is_embedded, model_device, model_identity

# Every stage samples its answers from its own stream of seeds: batch i of a stream is seeded with
# the stream's start + i (generate_records), and the starts lie SEED_STREAM_SPACING apart, so no two
# streams share a seed while each has fewer batches than that (a default run has under 20). Pos and
# neg answers to the same questions get separate streams, else their sampling noise is shared. The
# judge's data ignores --seed; every other stream is offset by it. Evaluated conditions (and the
# distillation teacher) sample from --seed itself: the conditions of one evaluation share that
# stream on purpose, so that a paired comparison draws the same random numbers for a question.
SEED_STREAM_SPACING = 10_000
SEED_STREAMS = {
    "extraction_pos": 0, "extraction_neg": 10_000,
    "judge_pos": 20_000, "judge_neg": 30_000,
    "finetuning_pos": 40_000, "finetuning_neg": 50_000, "finetuning_plain": 60_000,
    "reference_pos": 70_000, "reference_neg": 80_000,
}
FIXED_SEED_STREAMS = ("judge_pos", "judge_neg")


def stream_seed(stream: str, seed: int = 0) -> int:
    """The first seed of a stage's stream (SEED_STREAMS) for a run with this --seed."""
    return SEED_STREAMS[stream] + (0 if stream in FIXED_SEED_STREAMS else seed)


@dataclass(frozen=True)
class GenerationSettings:
    """How a model answers: everything a cached answer depends on besides the condition.

    The batch size is part of it because each batch is seeded on its own (seed + batch index):
    another batch size samples other answers."""

    model: str | None
    n_per_question: int
    max_new_tokens: int
    temperature: float
    top_p: float = 1.0
    batch_size: int = 64
    seed: int = 0
    dtype: str = "auto"

    @classmethod
    def for_model(cls, model: str | None, n_per_question: int | None = None, max_new_tokens: int | None = None,
                  temperature: float | None = None, **rest) -> "GenerationSettings":
        """Defaults that fit the model: short answers at temperature 0.7 on the embedded 135M model,
        Persona Vectors' settings (600 tokens, temperature 1) on real models."""
        embedded = is_embedded(model)
        return cls(model=model, n_per_question=n_per_question or (3 if embedded else 10),
                   max_new_tokens=max_new_tokens or (64 if embedded else 600),
                   temperature=(0.7 if embedded else 1.0) if temperature is None else temperature, **rest)

    @classmethod
    def from_flags(cls, args) -> "GenerationSettings":
        """From a stage's parsed flags (--model, --n_per_question, --max_new_tokens, --temperature,
        --top_p, --gen_batch_size, --seed, --dtype), as extraction and distillation name them."""
        return cls(model=args.model, n_per_question=args.n_per_question, max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, top_p=args.top_p, batch_size=args.gen_batch_size, seed=args.seed,
                   dtype=args.dtype)

    def identity(self, dtype: torch.dtype | None = None) -> dict:
        """The settings as a cache key; `dtype` is the resolved one ("auto" differs by machine)."""
        return {**asdict(self), "dtype": str(dtype) if dtype is not None else self.dtype}


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


def conversation(record: dict, with_context: bool = True) -> list[dict]:
    """A record's messages, preceded (with_context) by its system prompt and its few-shot
    demonstrations as earlier exchanges. Without context, only the question and the answer:
    what an adapter is trained on, so that it learns the elicited behaviour without the prompt."""
    messages = [m for m in record["messages"] if m["role"] != "system"]
    if not with_context:
        return messages
    context = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    for question, answer in record.get("demonstrations") or []:
        context += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return context + messages


class ChatSpan(NamedTuple):
    ids: list[int]
    response_start: int  # the first token of the final assistant turn
    response_end: int  # one past the answer's last token (the template's end-of-turn tokens excluded)


def _ids(encoded) -> list[int]:
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def tokenize_chat(tokenizer, messages: list[dict], max_length: int | None = None) -> ChatSpan:
    """Token ids of a whole conversation, where the final assistant response starts, and where the
    answer's own text ends (before the chat template's end-of-turn tokens)."""
    prompt_text = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    prompt_ids = _ids(tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True))
    full_ids = _ids(tokenizer.apply_chat_template(messages, tokenize=True))
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise PersonaLoRAError("the chat template renders the prompt differently with and without the response; "
                               "cannot locate the response tokens for this tokenizer")
    answer_ids = _ids(tokenizer(prompt_text + messages[-1]["content"], add_special_tokens=False))
    end = len(prompt_ids)
    while end < min(len(answer_ids), len(full_ids)) and answer_ids[end] == full_ids[end]:
        end += 1
    if max_length is not None:
        full_ids = full_ids[:max_length]
    return ChatSpan(full_ids, min(len(prompt_ids), len(full_ids)), min(end, len(full_ids)))


def pad_right(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right padding, so positions start at 0 for every row in plain forward passes."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        mask[row, : len(sequence)] = 1
    return ids, mask


class _PackedRow(NamedTuple):
    """One forward row: a prompt read once, then the answers of every span that shares it, each
    answer attending to the prompt and to itself only, at the positions it would have alone."""
    ids: list[int]
    positions: list[int]
    segments: list[int]  # 0 for the prompt, k for the k-th answer
    members: list[tuple[int, list[int], list[int]]]  # (span index, row indices predicting its tokens, its tokens)


def _packed_rows(spans: list[tuple[list[int], int, int]], pack: bool, most: int) -> list[_PackedRow]:
    """Rows of at most `most` answers each (a batch then holds no more answers, nor answer logits,
    than it did one sequence a row: 20 samples of 384 tokens to one prompt stay several rows)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, (ids, start, _) in enumerate(spans):
        groups.setdefault(tuple(ids[:start]) if pack else (index,), []).append(index)
    chunks = [members[i:i + most] for members in groups.values() for i in range(0, len(members), most)]
    rows = []
    for members in chunks:
        first_ids, prompt_length, _ = spans[members[0]]
        ids, positions = list(first_ids[:prompt_length]), list(range(prompt_length))
        segments, placed = [0] * prompt_length, []
        for segment, index in enumerate(members, start=1):
            answer = spans[index][0][prompt_length:spans[index][2]]
            begin = len(ids)
            # Token j of the answer is predicted by the one before it: the prompt's last token for j = 0.
            placed.append((index, [prompt_length - 1] + list(range(begin, begin + len(answer) - 1)), answer))
            ids += answer
            positions += range(prompt_length, prompt_length + len(answer))
            segments += [segment] * len(answer)
        rows.append(_PackedRow(ids, positions, segments, placed))
    return rows


def _packed_attention_mask(rows: list[_PackedRow], width: int, dtype: torch.dtype) -> torch.Tensor:
    """[rows, 1, width, width] additive mask: causal within the packed order, and an answer never
    sees another answer. Padding positions see themselves only (no row of the softmax is empty)."""
    allowed = torch.zeros((len(rows), width, width), dtype=torch.bool)
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    for r, row in enumerate(rows):
        segments = torch.tensor(row.segments)
        n = len(segments)
        same = (segments[:, None] == segments[None, :]) | (segments[None, :] == 0)
        allowed[r, :n, :n] = same & causal[:n, :n]
        allowed[r, range(n, width), range(n, width)] = True
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


@torch.no_grad()
def answer_token_log_probs(model, pad_id: int, spans: list[tuple[list[int], int, int]], batch_size: int = 8,
                           desc: str = "scoring answers") -> list[torch.Tensor]:
    """For each (token ids, answer start, answer end): the log-probability the model gives each of
    the answer's tokens given everything before it (teacher-forced, no sampling), in input order.

    The one teacher-forced scorer (the margin, A/B choices, the coherence proxy's fluency).
    Answers to the same prompt (an A/B item's two choices; a question's pos and neg reference
    answers) are packed into one row: the prompt is read once, each answer after it at the
    positions it would have alone, masked from the other answers (a 4-D attention mask), so the
    values are those of one sequence at a time, to float tolerance (tests/test_prefix_reuse.py).
    Models whose cache is not plain full attention (sliding windows) take one row per span. A batch
    holds batch_size answers (so no more answer logits than one sequence a row), its rows of
    similar length (less padding), and the vocabulary-wide projection is computed only at
    the positions that predict an answer token (logits_to_keep): a prompt's logits would be thrown
    away. Right padding. An activation steerer active around this call steers from each row's last
    prompt token on (eval.activations.teacher_forced_response), every answer of the row included."""
    from eval.activations import teacher_forced_response  # here: eval.activations imports this module

    device = model_device(model)
    if any(start < 1 for _, start, _ in spans):
        raise ValueError("answer_token_log_probs: every span needs a prompt before its answer (start ≥ 1)")
    # The 4-D mask is read as written by sdpa and eager attention only (flash attention takes a padding mask).
    pack = (len(spans) > 1 and _reuses_prefixes(model)
            and getattr(model.config, "_attn_implementation", "sdpa") in ("sdpa", "eager"))
    rows = _packed_rows(spans, pack=pack, most=batch_size)
    packed = any(len(row.members) > 1 for row in rows)
    results: list[torch.Tensor | None] = [None] * len(spans)
    batches, batch = [], []
    for row in sorted(rows, key=lambda row: len(row.ids)):  # batch_size answers a batch, as many rows as hold them
        if batch and sum(len(r.members) for r in batch) + len(row.members) > batch_size:
            batches.append(batch)
            batch = []
        batch.append(row)
    batches += [batch] if batch else []
    for batch in tqdm(batches, desc=desc, leave=False, disable=len(batches) < 4):
        input_ids, attention_mask = pad_right([row.ids for row in batch], pad_id)
        # Exactly the positions that predict an answer token, per row (a boolean logits_to_keep: the
        # logits come back flattened, [kept, vocabulary]); one range for the whole batch would give
        # every short row the width of the longest packed one.
        keep = torch.zeros(input_ids.shape, dtype=torch.bool)
        for r, row in enumerate(batch):
            for _, predictors, answer in row.members:
                keep[r, predictors[:len(answer)]] = True
        flat = (keep.flatten().cumsum(0) - 1).view(keep.shape)  # each kept position's row in the flattened logits
        inputs = dict(input_ids=input_ids.to(device), logits_to_keep=keep.to(device))
        if packed:
            positions, _ = pad_right([row.positions for row in batch], 0)
            inputs.update(position_ids=positions.to(device), use_cache=False,
                          attention_mask=_packed_attention_mask(batch, input_ids.shape[1], model.dtype).to(device))
        else:
            inputs["attention_mask"] = attention_mask.to(device)
        prompt_lengths = torch.tensor([row.segments.count(0) for row in batch])
        with teacher_forced_response(prompt_lengths):
            logits = model(**inputs).logits
        for row_index, row in enumerate(batch):
            for index, predictors, answer in row.members:
                if not answer:
                    results[index] = torch.zeros(0)
                    continue
                predicted = logits[flat[row_index, predictors].to(logits.device)].float().log_softmax(-1)
                targets = torch.tensor(answer, device=predicted.device)
                results[index] = predicted.gather(1, targets[:, None])[:, 0].cpu()
    return results


def response_log_likelihoods(model, tokenizer, conversations: list[list[dict]], batch_size: int = 8,
                             max_length: int | None = None) -> list[float]:
    """Per conversation, the mean log-probability (nats per token) the model gives the tokens of
    its final assistant answer, given everything before it: teacher-forced, no sampling. Batched
    small, because full-vocabulary logits of long answers are what takes the memory on big models."""
    spans = [tokenize_chat(tokenizer, c, max_length) for c in conversations]
    scored = answer_token_log_probs(model, tokenizer.pad_token_id, [(s.ids, s.response_start, s.response_end) for s in spans],
                                    batch_size)
    return [float(values.mean()) if len(values) else float("nan") for values in scored]


# ---------------------------------------------------------------------------------------------
# Shared-prompt-prefix reuse (transformers' prompt-cache reuse, batched)
#
# Elicitation prompts share long prefixes: the system prompt and K demonstrations are the same for
# every question of an instruction, and samples of one question share their whole prompt. The key/
# value cache of a prefix is computed once (one row) and copied into every row that starts with it;
# each row then runs only its own suffix. Keys and values of a prefix do not depend on what follows
# it (causal attention), and positions come from the attention mask, so answers equal the plain
# path's to float tolerance and sampling draws the same random numbers (same batch, same seed).
# ---------------------------------------------------------------------------------------------

_PREFIX_REUSE: contextvars.ContextVar[bool] = contextvars.ContextVar("prefix_reuse", default=True)
_PROMPT_PREFIX_PASS: contextvars.ContextVar[bool] = contextvars.ContextVar("prompt_prefix_pass", default=False)
MIN_SHARED_PREFIX = 16  # tokens: below this a separate prefill costs more than it saves


@contextlib.contextmanager
def prefix_reuse(enabled: bool = True):
    """Switch shared-prefix reuse on or off inside the block (on by default; the benchmark and the
    tests compare against the plain path)."""
    token = _PREFIX_REUSE.set(enabled)
    try:
        yield
    finally:
        _PREFIX_REUSE.reset(token)


@contextlib.contextmanager
def _prompt_prefix_pass():
    """Forward passes in this block read a prompt prefix alone: never the last prompt token, so
    activation steering treats every position as prompt (eval.activations.ActivationSteerer)."""
    token = _PROMPT_PREFIX_PASS.set(True)
    try:
        yield
    finally:
        _PROMPT_PREFIX_PASS.reset(token)


def in_prompt_prefix_pass() -> bool:
    return _PROMPT_PREFIX_PASS.get()


def _common_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def shared_prefix_groups(sequences: list[list[int]], limits: list[int],
                         min_shared: int = MIN_SHARED_PREFIX) -> list[tuple[int, list[int]]]:
    """Rows grouped by the tokens they start with: [(prefix length, rows)], every row in exactly one
    group, a group's prefix at most each of its rows' limit. Rows that share no prefix worth a cache
    (min_shared tokens, with at least one other row) come last, in a group of length 0.

    Sorted token lists put rows with a common start next to each other; a row joins the running
    group while the prefix they all share stays at least half of the group's (a system prompt and
    its demonstrations: hundreds of tokens; two different system prompts share only the template's
    first few)."""
    order = sorted(range(len(sequences)), key=lambda i: sequences[i][:limits[i]])
    groups, current, shared, previous = [], [], 0, []
    for i in order:
        sequence = sequences[i][:max(0, limits[i])]
        if current:
            common = min(shared, _common_length(previous, sequence))
            if common >= max(min_shared, shared // 2):
                current.append(i)
                shared, previous = common, sequence
                continue
            groups.append((shared, current))
        current, shared, previous = [i], len(sequence), sequence
    if current:
        groups.append((shared, current))
    kept = [(length, sorted(rows)) for length, rows in groups if len(rows) > 1 and length >= min_shared]
    loose = sorted(i for length, rows in groups if not (len(rows) > 1 and length >= min_shared) for i in rows)
    return kept + ([(0, loose)] if loose else [])


def _reuses_prefixes(model) -> bool:
    """Reuse is on and the model's cache is plain full attention (sliding-window or recurrent
    layers keep other state than one key/value per token: those models take the plain path)."""
    if not _PREFIX_REUSE.get():
        return False
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    try:
        layers = DynamicCache(config=model.config).layers
    except Exception:
        return False
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


_PREFIX_MEMO: contextvars.ContextVar[dict | None] = contextvars.ContextVar("prefix_memo", default=None)
PREFIX_MEMO_BYTES = 512 * 2**20  # keys/values kept across the batches of one generate_records call


@contextlib.contextmanager
def _prefix_memo():
    """Inside the block, prefix_cache_states keeps what it computed and starts from the longest
    prefix it already holds: the batches of one generate_records call (one model, one steering
    state) share their system prompts and demonstrations. Dropped at the end of the block. Keyed by
    token ids alone: never change the weights or the steering inside the block (callers steer
    around generate_records, as cached_generation's while_generating does)."""
    token = _PREFIX_MEMO.set({})
    try:
        yield
    finally:
        _PREFIX_MEMO.reset(token)


@torch.no_grad()
def prefix_cache_states(model, prefix_ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the keys and values [1, kv_heads, len, head_dim] of one prompt prefix read alone
    (positions 0..len−1): what any longer sequence starting with it holds at those positions."""
    from transformers import DynamicCache

    memo = _PREFIX_MEMO.get()
    known, states = 0, None
    for key, held in (memo or {}).items():
        common = _common_length(key, prefix_ids)
        if common > known:
            known, states = common, held
    states = [(keys[:, :, :known], values[:, :, :known]) for keys, values in states] if states is not None else None
    if known < len(prefix_ids):
        input_ids = torch.tensor([prefix_ids[known:]], dtype=torch.long, device=model_device(model))
        with _prompt_prefix_pass():
            output = model(input_ids=input_ids, cache=DynamicCache(ddp_cache_data=states), use_cache=True, logits_to_keep=1)
        states = [(keys, values) for keys, values, *_ in output.cache]
    if memo is not None and known < len(prefix_ids):
        memo[tuple(prefix_ids)] = states
        sizes = {key: sum(k.nbytes + v.nbytes for k, v in held) for key, held in memo.items()}
        while len(memo) > 1 and sum(sizes.values()) > PREFIX_MEMO_BYTES:
            sizes.pop(oldest := next(iter(memo)))
            del memo[oldest]
    return states


@torch.no_grad()
def _generate_reusing_prefixes(model, prompt_ids: list[list[int]], pad_id: int, generate_kwargs: dict,
                               seed: int | None) -> torch.Tensor:
    """model.generate on a batch whose rows share prompt prefixes: each shared prefix is prefilled
    once and its keys/values copied into its rows' cache; generate then runs only the suffixes.

    Row layout (width P + S): [pad … | prefix | pad … | suffix], the prefix right-aligned in the P
    cached slots and the suffix right-aligned in the S new ones. Padding is masked out as keys and
    positions count only unmasked tokens (generate derives them from the attention mask), so every
    row reads exactly its own prompt at positions 0..len−1. Each suffix keeps at least two tokens:
    the last prompt token must be read in generate's first pass, and that pass is then a prompt pass
    for activation steering, as it is without reuse.

    The cache is a StaticCache sized for the whole answer: a DynamicCache concatenates every layer's
    keys and values at every new token, which with long few-shot prompts costs more than the model."""
    from transformers import StaticCache

    device = model_device(model)
    groups = shared_prefix_groups(prompt_ids, [len(ids) - 2 for ids in prompt_ids])
    prefix_length = [0] * len(prompt_ids)
    for length, rows in groups:
        for row in rows:
            prefix_length[row] = length
    cached = max(prefix_length)
    suffix = max(len(ids) - p for ids, p in zip(prompt_ids, prefix_length))
    input_ids = torch.full((len(prompt_ids), cached + suffix), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, (ids, p) in enumerate(zip(prompt_ids, prefix_length)):
        input_ids[row, cached - p:cached] = torch.tensor(ids[:p], dtype=torch.long)
        attention_mask[row, cached - p:cached] = 1
        input_ids[row, cached + suffix - (len(ids) - p):] = torch.tensor(ids[p:], dtype=torch.long)
        attention_mask[row, cached + suffix - (len(ids) - p):] = 1

    cache = StaticCache(config=model.config, max_cache_len=cached + suffix + generate_kwargs["max_new_tokens"])
    if cached:
        layers = None
        for length, rows in groups:
            if length == 0:
                continue
            states = prefix_cache_states(model, prompt_ids[rows[0]][:length])
            if layers is None:
                layers = [tuple(torch.zeros((len(prompt_ids), t.shape[1], cached, t.shape[-1]), dtype=t.dtype, device=t.device)
                                for t in layer) for layer in states]
            index = torch.tensor(rows)
            for (keys, values), (row_keys, row_values) in zip(states, layers):
                # Each layer's own device: with device_map="auto" a big model's layers sit on several GPUs.
                row_keys[index.to(row_keys.device), :, cached - length:] = keys
                row_values[index.to(row_values.device), :, cached - length:] = values
            del states
        for layer_index, (keys, values) in enumerate(layers):
            cache.update(keys, values, layer_index)
        del layers
    if seed is not None:
        torch.manual_seed(seed)
    output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), cache=cache,
                            disable_compile=True, **generate_kwargs)
    return output[:, input_ids.shape[1]:]


@torch.no_grad()
def generate_batch(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int, temperature: float,
                   top_p: float = 1.0, seed: int | None = None) -> list[str]:
    """Answers to a batch of conversations (each ending with a user turn), left-padded. Prompt
    prefixes shared by several rows (a system prompt and its demonstrations; a question sampled n
    times) are computed once (see _generate_reusing_prefixes); the answers are those of the plain
    batch, to float tolerance, with the same random draws."""
    prompts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
    generate_kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling)
    if len(prompts) > 1 and _reuses_prefixes(model):
        prompt_ids = [_ids(tokenizer(p, add_special_tokens=False)) for p in prompts]
        new_tokens = _generate_reusing_prefixes(model, prompt_ids, tokenizer.pad_token_id, generate_kwargs, seed)
        return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model_device(model))
    if seed is not None:
        torch.manual_seed(seed)
    output = model.generate(**inputs, **generate_kwargs)
    return tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def generate_records(model, tokenizer, jobs: list[dict], output_path: str | os.PathLike, *, max_new_tokens: int,
                     temperature: float, top_p: float = 1.0, batch_size: int = 32, seed: int = 0,
                     desc: str = "generating") -> list[dict]:
    """Answer every job ({"id", "system", "demonstrations", "messages": [..., user turn], ...}) and
    write JSONL records with the answer appended as an assistant message.

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
    order = sorted(range(len(jobs)), key=lambda i: len(json.dumps(conversation(jobs[i]))))
    batches = [[jobs[i] for i in order[start:start + batch_size]] for start in range(0, len(order), batch_size)]
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with partial_path.open("a") as sink, tqdm(total=len(jobs), desc=desc, initial=sum(j["id"] in done for j in jobs)) as bar, \
            _prefix_memo(), STAGES.stage(desc, "tokens") as work:
        for index, batch in enumerate(batches):
            if all(job["id"] in done for job in batch):
                continue
            answers = generate_batch(model, tokenizer, [conversation(j) for j in batch], max_new_tokens, temperature, top_p,
                                     seed=seed + index)
            work["count"] += sum(len(tokenizer(answer, add_special_tokens=False).input_ids) for answer in answers)
            for job, answer in zip(batch, answers):
                record = {**job, "messages": [*job["messages"], {"role": "assistant", "content": answer.strip()}]}
                done[job["id"]] = record
                sink.write(json.dumps(record) + "\n")
            sink.flush()
            bar.update(len(batch))
    records = [done[job["id"]] for job in jobs]
    write_jsonl(output_path, records)
    partial_path.unlink(missing_ok=True)
    return records


# ---------------------------------------------------------------------------------------------
# The one reuse rule for generated answers
# ---------------------------------------------------------------------------------------------


def answers_identity(settings: GenerationSettings, dtype: torch.dtype, seed: int, **what) -> dict:
    """Everything a file of generated answers depends on: the generation settings with the dtype
    resolved, the model's files (not only its name), the seed the batches are drawn from, and what
    the caller adds (`what`: the trait file's hash, the demonstrations, the condition steered...)."""
    return {**settings.identity(dtype), "model_files": model_identity(settings.model), "generation_seed": seed, **what}


def identity_key(identity: dict) -> str:
    """A short digest of an identity, for files that keep several variants side by side."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _identity_record(path: Path) -> Path:
    return path.with_name(path.name.removesuffix(".jsonl") + ".generation.json")


def reusable_answers(path: str | os.PathLike, identity: dict, jobs: list[dict]) -> list[dict] | None:
    """The finished answers at `path` if they were generated with this identity for these jobs;
    None if there are none yet (or only a partial file of this identity, which generation continues).
    Answers, finished or partial, recorded with another identity (or with none) are refused, naming
    what changed: they are somebody's work, never silently overwritten nor mixed with new answers."""
    path = Path(path)
    record_path, partial = _identity_record(path), path.with_name(path.name + ".partial")
    if not (path.is_file() or partial.is_file()):
        return None
    recorded = json.loads(record_path.read_text()) if record_path.is_file() else None
    wanted = json.loads(json.dumps(identity, default=str))  # as it reads back from JSON
    if recorded != wanted:
        legacy = " (a folder-wide generation.json is the record of an older version, not trusted)" \
            if recorded is None and (path.parent / "generation.json").is_file() else ""
        how = f"with no record of how they were made{legacy}" if recorded is None else "generated with other settings (" + \
            ", ".join(sorted(k for k in {*wanted, *recorded} if recorded.get(k) != wanted.get(k))) + ")"
        raise PersonaLoRAError(f"{path if path.is_file() else partial} holds answers {how}; "
                               "delete it to regenerate, or pass the settings it was made with")
    if not path.is_file():
        return None
    records = read_jsonl(path)
    if [r.get("id") for r in records] != [j["id"] for j in jobs]:
        raise PersonaLoRAError(f"{path} answers other jobs than this run asks for; delete it to regenerate")
    return records


def cached_generation(model, tokenizer, jobs: list[dict], path: str | os.PathLike, settings: GenerationSettings, *,
                      seed: int, desc: str, identity: dict | None = None, while_generating=contextlib.nullcontext,
                      **what) -> list[dict]:
    """Every stage's generated answers go through here, under one reuse rule (reusable_answers):
    answers made with the same identity (answers_identity(settings, model.dtype, seed, **what), or
    the `identity` a caller already built) are reused, an interrupted run is continued, anything
    else is refused. The identity is written beside the answers (<name>.generation.json) before the
    first one is generated. `while_generating()` (e.g. a steering context) is entered only when
    answers are actually generated."""
    path = Path(path)
    identity = identity or answers_identity(settings, model.dtype, seed, **what)
    records = reusable_answers(path, identity, jobs)
    if records is not None:
        print(f"reusing {path} ({len(records)} answers made with the same settings)")
        return records
    write_json(_identity_record(path), identity)
    with while_generating():
        return generate_records(model, tokenizer, jobs, path, max_new_tokens=settings.max_new_tokens,
                                temperature=settings.temperature, top_p=settings.top_p, batch_size=settings.batch_size,
                                seed=seed, desc=desc)
