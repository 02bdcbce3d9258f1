"""Activation space (Persona Vectors' conventions): response-token hidden states and persona vectors.

`hidden_states` from the model has L+1 entries (the embeddings, then each block's output); a
persona vector is v[ℓ] = mean over pos examples of the mean response-token hidden_states[ℓ],
minus the same over neg examples, saved as a tensor [L+1, hidden].
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from eval.generation import chat_with_system, pad_right, tokenize_chat
from lora_utils import model_device


@torch.no_grad()
def response_hidden_means(model, tokenizer, records: list[dict], include_system: bool = True, batch_size: int = 16,
                          max_length: int | None = None, desc: str = "hidden states") -> torch.Tensor:
    """Per example, the mean over its response tokens of every layer's hidden state: [N, L+1, hidden] (float32)."""
    encoded = []
    for record in records:
        messages = chat_with_system(record["messages"], record.get("system") if include_system else None)
        ids, response_start = tokenize_chat(tokenizer, messages, max_length)
        encoded.append((ids, min(response_start, len(ids) - 1)))
    means = []
    for start in tqdm(range(0, len(encoded), batch_size), desc=desc):
        chunk = encoded[start:start + batch_size]
        input_ids, attention_mask = pad_right([ids for ids, _ in chunk], tokenizer.pad_token_id)
        device = model_device(model)
        output = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), output_hidden_states=True)
        response_mask = torch.zeros_like(attention_mask, dtype=torch.float32)
        for row, (ids, response_start) in enumerate(chunk):
            response_mask[row, response_start:len(ids)] = 1.0
        weights = (response_mask / response_mask.sum(1, keepdim=True)).to(device)
        # One layer at a time: stacking all L+1 layers in float32 would cost GBs on an 8B model.
        per_layer = [torch.einsum("bth,bt->bh", h.float(), weights.to(h.device)).cpu() for h in output.hidden_states]
        means.append(torch.stack(per_layer, dim=1))
    return torch.cat(means)


def persona_vector(pos_means: torch.Tensor, neg_means: torch.Tensor) -> torch.Tensor:
    """v = mean(pos) − mean(neg) over examples: [L+1, hidden]."""
    return pos_means.mean(0) - neg_means.mean(0)
