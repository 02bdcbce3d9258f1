"""Activation space (Persona Vectors' conventions): response-token hidden states and persona vectors.

`hidden_states` from the model has L+1 entries (the embeddings, then each block's output); a
persona vector is v[ℓ] = mean over pos examples of the mean response-token hidden_states[ℓ],
minus the same over neg examples, saved as a tensor [L+1, hidden].
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from eval.generation import chat_with_system, pad_right, tokenize_chat
from io_utils import PersonaLoRAError
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


@torch.no_grad()
def span_hidden_means(model, spans: list[tuple[list[int], int]], pad_id: int, batch_size: int = 16,
                      desc: str = "hidden states") -> torch.Tensor:
    """For each (token ids, response start), the mean over the response tokens of every layer's
    hidden state: [N, L+1, hidden] (float32). Right padding, so positions start at 0 in every row."""
    means = []
    device = model_device(model)
    for start in tqdm(range(0, len(spans), batch_size), desc=desc):
        chunk = [(ids, min(response_start, len(ids) - 1)) for ids, response_start in spans[start:start + batch_size]]
        input_ids, attention_mask = pad_right([ids for ids, _ in chunk], pad_id)
        output = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), output_hidden_states=True)
        response_mask = torch.zeros_like(attention_mask, dtype=torch.float32)
        for row, (ids, response_start) in enumerate(chunk):
            response_mask[row, response_start:len(ids)] = 1.0
        weights = response_mask / response_mask.sum(1, keepdim=True)
        # One layer at a time: stacking all L+1 layers in float32 would cost GBs on an 8B model.
        per_layer = [torch.einsum("bth,bt->bh", h.float(), weights.to(h.device)).cpu() for h in output.hidden_states]
        means.append(torch.stack(per_layer, dim=1))
    return torch.cat(means)


def response_hidden_means(model, tokenizer, records: list[dict], include_system: bool = True, batch_size: int = 16,
                          max_length: int | None = None, desc: str = "hidden states") -> torch.Tensor:
    """Per chat record, the mean over its final response's tokens of every layer's hidden state: [N, L+1, hidden]."""
    spans = [tokenize_chat(tokenizer, chat_with_system(r["messages"], r.get("system") if include_system else None), max_length)
             for r in records]
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


class ActivationSteerer:
    """Persona Vectors' activation steering: add coef·v[layer] to the output of block layer−1
    (hidden_states[layer] is that block's output). `positions`:
        all       every position of every forward pass;
        prompt    only the prompt (the prefill pass, when more than one position is processed);
        response  only the last position of each pass, i.e. every generated token (and, as in
                  Persona Vectors, the final prompt token that produces the first one).
    A context manager: the hook is always removed, also when the body raises."""

    def __init__(self, model, vector: torch.Tensor, layer: int, coef: float, positions: str = "response"):
        layers = decoder_layers(model)
        if vector.ndim != 2 or vector.shape[0] != len(layers) + 1:
            raise ValueError(f"the persona vector has shape {tuple(vector.shape)}; expected [{len(layers) + 1}, hidden] for this model")
        if not 1 <= layer <= len(layers):
            raise ValueError(f"--layer {layer} is outside 1..{len(layers)}")
        if positions not in STEERING_TYPES:
            raise ValueError(f"--steering_type {positions!r} is not one of {', '.join(STEERING_TYPES)}")
        self.block = layers[layer - 1]
        self.steer = coef * vector[layer]
        self.positions = positions
        self.handle = None

    def _hook(self, module, inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        steer = self.steer.to(device=hidden.device, dtype=hidden.dtype)
        if self.positions == "all":
            hidden = hidden + steer
        elif self.positions == "prompt":
            if hidden.shape[1] == 1:
                return output
            hidden = hidden + steer
        else:
            hidden = torch.cat([hidden[:, :-1], hidden[:, -1:] + steer], dim=1)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def __enter__(self):
        self.handle = self.block.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc_info):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
