"""Activation space (Persona Vectors' conventions): answer-token hidden states, persona vectors,
and activation steering.

`hidden_states` from the model has L+1 entries (the embeddings, then each block's output); a
persona vector is v[ℓ] = mean over pos examples of the mean answer-token hidden_states[ℓ],
minus the same over neg examples, saved as a tensor [L+1, hidden]. Answer tokens are the answer's
own text: the chat template's end-of-turn tokens are not averaged, as in Persona Vectors.
"""

from __future__ import annotations

import contextlib
import contextvars
from pathlib import Path

import torch
from tqdm.auto import tqdm

from eval.generation import conversation, in_prompt_prefix_pass, pad_right, tokenize_chat
from io_utils import STAGES, PersonaLoRAError
from model_loading import model_device


def load_vector(path) -> torch.Tensor:
    """A saved persona vector [L+1, hidden] as float32, refused with one line if missing or malformed."""
    if not Path(path).is_file():
        raise PersonaLoRAError(f"persona vector not found: {path} (extract_persona_lora.py writes it)")
    try:
        vector = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise PersonaLoRAError(f"cannot read persona vector {path}: {type(error).__name__}") from None
    if not isinstance(vector, torch.Tensor) or vector.ndim != 2 or not torch.isfinite(vector).all():
        raise PersonaLoRAError(f"{path} is not a finite persona vector of shape [L+1, hidden]")
    return vector.float()


def _weighted_layer_means(hidden_states, weights: torch.Tensor) -> torch.Tensor:
    """[rows, L+1, hidden]: per row, the weights' average of every layer's hidden states. One layer
    at a time: stacking all L+1 layers in float32 would cost GBs on an 8B model."""
    return torch.stack([torch.einsum("bth,bt->bh", h.float(), weights.to(h.device)).cpu() for h in hidden_states], dim=1)


@torch.no_grad()
def span_hidden_means(model, spans: list[tuple[list[int], int, int]], pad_id: int, batch_size: int = 16,
                      desc: str = "hidden states") -> torch.Tensor:
    """For each (token ids, answer start, answer end), the mean over the answer's tokens of every
    layer's hidden state: [N, L+1, hidden] (float32). An empty answer falls back to its last token.

    Spans that share a prompt prefix (a system prompt and its demonstrations) have it read once:
    its keys/values are computed alone and each row then reads only the rest of its prompt and its
    answer over them (eval.generation.prefix_reuse). Hidden states of a token depend only on the
    tokens before it, so the means are those of whole sequences read one by one, to float
    tolerance; nothing after an answer's last token is read. Right padding, so positions follow on
    from the prefix in every row."""
    from transformers import DynamicCache

    from eval.generation import _reuses_prefixes, prefix_cache_states, shared_prefix_groups

    chunk = []
    for ids, answer_start, answer_end in spans:
        answer_start = min(answer_start, len(ids) - 1)
        chunk.append((ids, answer_start, max(answer_end, answer_start + 1)))
    spans = chunk
    if spans and _reuses_prefixes(model):
        # A prefix stops before the last prompt token: that token is a "response" position for steering.
        groups = shared_prefix_groups([ids for ids, _, _ in spans], [start - 1 for _, start, _ in spans])
    else:
        groups = [(0, list(range(len(spans))))]
    device = model_device(model)
    means = [None] * len(spans)
    with tqdm(total=sum(-(-len(rows) // batch_size) for _, rows in groups), desc=desc) as bar, \
            STAGES.stage(desc, "tokens") as work:
        for length, rows in groups:
            states = prefix_cache_states(model, spans[rows[0]][0][:length]) if length else None
            rows = sorted(rows, key=lambda r: spans[r][2] - length)  # similar lengths together: less padding
            for batch in (rows[i:i + batch_size] for i in range(0, len(rows), batch_size)):
                input_ids, attention_mask = pad_right([spans[r][0][length:spans[r][2]] for r in batch], pad_id)
                cache = {}
                if states is not None:
                    attention_mask = torch.cat([torch.ones((len(batch), length), dtype=attention_mask.dtype), attention_mask], 1)
                    cache["cache"] = DynamicCache(ddp_cache_data=[(k.expand(len(batch), -1, -1, -1), v.expand(len(batch), -1, -1, -1))
                                                                  for k, v in states])
                with teacher_forced_response(torch.tensor([spans[r][1] - length for r in batch])):
                    output = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                   output_hidden_states=True, logits_to_keep=1, **cache)
                work["count"] += sum(spans[r][2] - length for r in batch)  # the tokens actually read
                weights = torch.zeros(input_ids.shape, dtype=torch.float32)
                for row, r in enumerate(batch):
                    weights[row, spans[r][1] - length:spans[r][2] - length] = 1.0
                weights /= weights.sum(1, keepdim=True)
                for r, mean in zip(batch, _weighted_layer_means(output.hidden_states, weights)):
                    means[r] = mean
                bar.update(1)
    return torch.stack(means)


def response_hidden_means(model, tokenizer, records: list[dict], with_context: bool = True, batch_size: int = 16,
                          max_length: int | None = None, desc: str = "hidden states") -> torch.Tensor:
    """Per chat record, the mean over its answer's tokens of every layer's hidden state: [N, L+1, hidden].
    with_context: the answer is read after its system prompt and demonstrations, as it was generated
    (Persona Vectors' convention for the persona vector)."""
    spans = [tokenize_chat(tokenizer, conversation(r, with_context), max_length) for r in records]
    return span_hidden_means(model, spans, tokenizer.pad_token_id, batch_size, desc)


def persona_vector(pos_means: torch.Tensor, neg_means: torch.Tensor) -> torch.Tensor:
    """v = mean(pos) − mean(neg) over examples: [L+1, hidden]."""
    return pos_means.mean(0) - neg_means.mean(0)


def decoder_layers(model) -> torch.nn.ModuleList:
    """The model's list of transformer blocks (model.model.layers for Llama, Qwen, Mistral, ...)."""
    for name, module in model.named_modules():
        if name.endswith("layers") and isinstance(module, torch.nn.ModuleList):
            return module
    raise ValueError("cannot find the decoder layers (a ModuleList named 'layers') of this model")


STEERING_TYPES = ("all", "prompt", "response")

# In a teacher-forced forward pass (scoring a given answer, not generating one), the answer's first
# token per row: "response" steering then covers the positions that generation would have steered.
_TEACHER_FORCED_STARTS: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("teacher_forced_starts", default=None)


@contextlib.contextmanager
def teacher_forced_response(answer_starts: torch.Tensor):
    """Declare that forward passes in this block score whole sequences (right-padded, row r's
    answer starting at answer_starts[r]), so that activation steering applies to the positions it
    would have applied to while generating them."""
    token = _TEACHER_FORCED_STARTS.set(answer_starts)
    try:
        yield
    finally:
        _TEACHER_FORCED_STARTS.reset(token)


def default_layer(num_layers: int) -> int:
    """The steered layer when none is given: two thirds of the depth (layer 20 of SmolLM2-135M's 30,
    21 of Llama-3.1-8B's 32), where Persona Vectors found trait directions steer best."""
    return round(2 * num_layers / 3)


def check_vector_fits(vector_path, config, layer: int | None = None, flag: str = "--vector_path",
                      layer_flag: str = "--layer") -> tuple[torch.Tensor, int]:
    """The one fit check for a persona vector: readable, finite, of shape [L+1, hidden] for the
    model whose config is given, and a steerable layer (the default one when `layer` is None).
    Returns (vector, layer); refuses in one line naming the flag, before any model loads."""
    vector = load_vector(vector_path)
    num_layers = config.num_hidden_layers
    check_vector_shape(vector, num_layers, config.hidden_size, f"{flag} {vector_path}")
    layer = default_layer(num_layers) if layer is None else layer
    check_steering_layer(layer, num_layers, layer_flag)
    return vector, layer


def check_vector_shape(vector: torch.Tensor, num_layers: int, hidden_size: int, what: str = "the persona vector") -> None:
    """A persona vector of a model with `num_layers` blocks is [L+1, hidden]."""
    if tuple(vector.shape) != (num_layers + 1, hidden_size):
        raise PersonaLoRAError(f"{what} has shape {tuple(vector.shape)}, but this model needs "
                               f"[{num_layers + 1}, {hidden_size}] (a vector for another model? pass --model)")


def check_steering_layer(layer: int, num_layers: int, flag: str = "--layer") -> None:
    """Steerable layers are 1..L−1: hidden_states[L] is taken after the model's final norm, while
    steering adds to the last block's output before it, so v[L] lives in another space."""
    if not 1 <= layer <= num_layers - 1:
        raise PersonaLoRAError(f"{flag} {layer} is outside 1..{num_layers - 1} (hidden_states[{num_layers}] is read after the "
                               "final norm, so the last layer cannot be steered along it)")


class ActivationSteerer:
    """Persona Vectors' activation steering: add coef·v[layer] to the output of block layer−1
    (hidden_states[layer] is that block's output). `positions`:
        all       every position of every forward pass;
        prompt    only the prompt (the prefill pass, when more than one position is processed);
        response  only the last position of each pass, i.e. every generated token (and, as in
                  Persona Vectors, the final prompt token that produces the first one).
    A shared prompt prefix read alone (eval.generation's prefix reuse) is all prompt: steered by
    "prompt", not by "response", as it would be inside the whole prompt's pass.
    Inside teacher_forced_response(starts), a pass over whole sequences is steered where
    generation would have steered it: response = from the last prompt token on, prompt = before it.
    A context manager: the hook is always removed, also when the body raises."""

    def __init__(self, model, vector: torch.Tensor, layer: int, coef: float, positions: str = "response"):
        layers = decoder_layers(model)
        if vector.ndim != 2 or vector.shape[0] != len(layers) + 1:
            raise PersonaLoRAError(f"the persona vector has shape {tuple(vector.shape)}; expected [{len(layers) + 1}, hidden] for this model")
        check_steering_layer(layer, len(layers))
        if positions not in STEERING_TYPES:
            raise PersonaLoRAError(f"--steering_type {positions!r} is not one of {', '.join(STEERING_TYPES)}")
        self.block = layers[layer - 1]
        self.steer = coef * vector[layer]
        self.positions = positions
        self.handle = None

    def _position_mask(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """[batch, positions, 1] of 0/1 where to add, or None for everywhere."""
        if self.positions == "all":
            return None
        if in_prompt_prefix_pass():  # a shared prompt prefix read alone: all prompt, never the last prompt token
            return None if self.positions == "prompt" else torch.zeros((*hidden.shape[:2], 1), dtype=hidden.dtype,
                                                                         device=hidden.device)
        starts = _TEACHER_FORCED_STARTS.get()
        length = hidden.shape[1]
        if starts is not None and len(starts) == hidden.shape[0]:
            positions = torch.arange(length, device=hidden.device)[None, :]
            first_steered = (starts.to(hidden.device) - 1)[:, None]  # the last prompt token produces the first answer token
            mask = positions >= first_steered if self.positions == "response" else positions < first_steered
        elif self.positions == "prompt":
            mask = torch.full((hidden.shape[0], length), length > 1, device=hidden.device)
        else:
            mask = torch.zeros((hidden.shape[0], length), dtype=torch.bool, device=hidden.device)
            mask[:, -1] = True
        return mask[..., None].to(hidden.dtype)

    def _hook(self, module, inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        steer = self.steer.to(device=hidden.device, dtype=hidden.dtype)
        mask = self._position_mask(hidden)
        hidden = hidden + (steer if mask is None else mask * steer)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def __enter__(self):
        self.handle = self.block.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc_info):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


@torch.no_grad()
def residual_states(model, spans: list[tuple[list[int], int, int]], pad_id: int, layer: int, batch_size: int = 8) -> torch.Tensor:
    """The residual stream at layer `layer` (the output of block layer−1, hidden_states[layer], where
    activation steering at `layer` adds c·v) on each answer token of `spans` (token ids, answer
    start, answer end), read teacher-forced: [tokens, hidden] float32, as the model is now (with
    whatever edit is applied)."""
    device = model_device(model)
    block = decoder_layers(model)[layer - 1]
    states = []
    for start in range(0, len(spans), batch_size):
        batch = spans[start:start + batch_size]
        input_ids, attention_mask = pad_right([list(ids[:end]) for ids, _, end in batch], pad_id)
        answer = torch.zeros(input_ids.shape, dtype=torch.bool)
        for row, (_, answer_start, answer_end) in enumerate(batch):
            answer[row, answer_start:answer_end] = True
        # Read by a hook registered after the edit's own (hooks run in registration order), so it
        # sees the block's output as the rest of the model does; the model's hidden_states
        # recorder may see it before an activation-steering hook acts.
        captured = {}
        handle = block.register_forward_hook(
            lambda module, inputs, output: captured.update(h=output[0] if isinstance(output, tuple) else output))
        try:
            with teacher_forced_response(torch.tensor([answer_start for _, answer_start, _ in batch])):
                model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), logits_to_keep=1)
        finally:
            handle.remove()
        states.append(captured["h"].float().cpu()[answer])
    return torch.cat(states)


def residual_changes(model, spans: list[tuple[list[int], int, int]], pad_id: int, layer: int, edit,
                     batch_size: int = 8, plain: torch.Tensor | None = None) -> torch.Tensor:
    """The change an edit of the model causes in the residual stream at layer `layer` on each answer
    token of `spans` (residual_states): [tokens, hidden] float32 of h_edited − h_plain. `edit` is a
    function returning a context manager that applies the edit (a merged diff: lambda:
    LoRASteerer(model, diff, α); a hooked vector: lambda: ActivationSteerer(model, v, layer, c));
    the model is the plain one outside it. `plain`: the plain model's states, if already read."""
    if plain is None:
        plain = residual_states(model, spans, pad_id, layer, batch_size)
    with edit():
        edited = residual_states(model, spans, pad_id, layer, batch_size)
    return edited - plain


def compare_changes(changes_a: torch.Tensor, changes_b: torch.Tensor) -> dict:
    """Two edits compared by what they do to the same tokens ([tokens, hidden] each, from
    residual_changes): the cosine and norm ratio ‖a‖/‖b‖ of their mean change vectors (the direction
    each pushes on average), the mean per-token cosine (do they agree token by token?), and the ratio
    of their root-mean-square per-token change norms. A per-token cosine is left out where either
    change is zero."""
    if changes_a.shape != changes_b.shape or not len(changes_a):
        raise PersonaLoRAError(f"compare changes of the same tokens: shapes {tuple(changes_a.shape)} and {tuple(changes_b.shape)}")
    a, b = changes_a.double(), changes_b.double()
    mean_a, mean_b = a.mean(0), b.mean(0)
    norms_a, norms_b = a.norm(dim=1), b.norm(dim=1)
    both = (norms_a > 0) & (norms_b > 0)
    per_token = (a[both] * b[both]).sum(1) / (norms_a[both] * norms_b[both])
    return {"mean_change_cosine": float(torch.nn.functional.cosine_similarity(mean_a, mean_b, dim=0)),
            "mean_change_norm_ratio": float(mean_a.norm() / mean_b.norm()) if mean_b.norm() > 0 else float("nan"),
            "per_token_cosine_mean": float(per_token.mean()) if len(per_token) else float("nan"),
            "rms_change_norm_ratio": float(norms_a.pow(2).mean().sqrt() / norms_b.pow(2).mean().sqrt())
            if norms_b.any() else float("nan"),
            "mean_change_norm": [float(mean_a.norm()), float(mean_b.norm())], "tokens": len(a)}


def functional_comparison(model, spans: list[tuple[list[int], int, int]], pad_id: int, layer: int, edits: dict,
                          batch_size: int = 8) -> dict:
    """Every pair of the named `edits` (name: function returning the edit's context manager)
    compared by the residual-stream change each causes at hidden_states[layer] on the answer tokens
    of `spans` (held-out inputs): {"a vs b": compare_changes(...)}. Two weight updates are compared
    by what they do, not by a whole-space weight cosine, which is near 0 for independently
    initialised updates whatever they do."""
    plain = residual_states(model, spans, pad_id, layer, batch_size)  # once, shared by every edit
    changes = {name: residual_changes(model, spans, pad_id, layer, edit, batch_size, plain) for name, edit in edits.items()}
    names = list(edits)
    return {f"{a} vs {b}": compare_changes(changes[a], changes[b]) for i, a in enumerate(names) for b in names[i + 1:]}
