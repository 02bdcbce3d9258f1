"""GGUF exports for llama.cpp (llama-server, llama-cli, Ollama): a persona diff as a GGUF LoRA
adapter, a persona vector as a llama.cpp control vector.

LoRA adapter. One lora_a (k × in) and lora_b (out × k) pair per module, under llama.cpp's tensor
names (blk.N.attn_q.weight.lora_a, ...), in float32. No coefficient is baked in and no alpha is
declared: llama.cpp scales a module by alpha/rank × the runtime scale when the adapter declares
an alpha, by the runtime scale alone when it does not (llama_adapter_lora_weight::get_scale), so
`--lora-scaled evil.gguf α` (or a request's scale) adds exactly α·ΔW, whatever each module's rank.

The q/k row permutation. convert_hf_to_gguf.py (LlamaModel.permute) stores the rows of Llama's
q_proj and k_proj reordered within each head: llama.cpp's rope rotates adjacent pairs of
dimensions where transformers' rotates the two halves. ΔW's output rows, the rows of B, get the
same reordering; A is untouched. Left out, the q/k part of the update lands on the wrong
dimensions (tests/test_gguf_export.py measures that this shows in llama.cpp's outputs).

Control vector. llama.cpp adds direction.N to the output of block N (0-based): common's loader
puts direction.N at slot N−1 of the buffer llama_set_adapter_cvec takes, "starting from layer 1",
and slot i−1 is added after block i (llama_adapter_cvec::apply, build_cvec). Persona Vectors'
steering "at layer ℓ" adds c·v[ℓ] to the output of block ℓ−1 (hidden_states[ℓ]), so v[ℓ] is
written as direction.(ℓ−1). There is no direction.0 in llama.cpp, so layer 1 cannot be exported.
The strength c is the runtime's (`--control-vector-scaled F.gguf c`), not baked in.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import numpy as np
import torch

from io_utils import PersonaLoRAError, atomic_path

# transformers architectures that convert_hf_to_gguf.py converts with LlamaModel (architecture
# "llama", q/k rows permuted). Only these are mapped: another architecture may name or order its
# tensors differently, and a wrong mapping would load silently and steer the wrong weights.
LLAMA_CPP_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama"}
# A persona diff's module -> llama.cpp's tensor (gguf.MODEL_TENSOR member name).
MODULE_TENSORS = {"q_proj": "ATTN_Q", "k_proj": "ATTN_K", "v_proj": "ATTN_V", "o_proj": "ATTN_OUT",
                  "gate_proj": "FFN_GATE", "up_proj": "FFN_UP", "down_proj": "FFN_DOWN"}
_MODULE_NAME = re.compile(r"^model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.weight$")


@dataclasses.dataclass(frozen=True)
class GGUFLayout:
    """What a GGUF export needs to know of the base model, read from its transformers config."""

    model: str
    architecture: str  # llama.cpp's general.architecture
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    permute_qk: bool = True  # convert_hf_to_gguf.py's LlamaModel.permute on q_proj/k_proj rows

    @classmethod
    def from_config(cls, config, model: str) -> "GGUFLayout":
        hf_architecture = (getattr(config, "architectures", None) or ["?"])[0]
        if hf_architecture not in LLAMA_CPP_ARCHITECTURES:
            raise PersonaLoRAError(f"cannot export for {model}: its architecture {hf_architecture} has no GGUF mapping here "
                                   f"(supported: {', '.join(LLAMA_CPP_ARCHITECTURES)}); use --format peft")
        heads = config.num_attention_heads
        return cls(model=model, architecture=LLAMA_CPP_ARCHITECTURES[hf_architecture], num_layers=config.num_hidden_layers,
                   hidden_size=config.hidden_size, intermediate_size=config.intermediate_size, num_heads=heads,
                   num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads)

    def module_shape(self, module: str) -> tuple[int, int]:
        """(out, in) of a projection."""
        attention_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {"q_proj": (attention_width, self.hidden_size), "k_proj": (kv_width, self.hidden_size),
                "v_proj": (kv_width, self.hidden_size), "o_proj": (self.hidden_size, attention_width),
                "gate_proj": (self.intermediate_size, self.hidden_size), "up_proj": (self.intermediate_size, self.hidden_size),
                "down_proj": (self.hidden_size, self.intermediate_size)}[module]

    def tensor_name(self, param_name: str) -> str:
        """'model.layers.3.self_attn.q_proj.weight' -> 'blk.3.attn_q.weight'; refuses what has no mapping."""
        import gguf

        match = _MODULE_NAME.match(param_name)
        if not match or match.group(2) not in MODULE_TENSORS:
            raise PersonaLoRAError(f"cannot export module {param_name} to GGUF: only the projections "
                                   f"{', '.join(MODULE_TENSORS)} of model.layers.N of a Llama-architecture model have a "
                                   "llama.cpp tensor here (a diff for another architecture?); use --format peft")
        block, module = int(match.group(1)), match.group(2)
        if block >= self.num_layers:
            raise PersonaLoRAError(f"cannot export module {param_name} for {self.model}: the model has {self.num_layers} "
                                   "layers (a diff for another model? pass --model)")
        return gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[MODULE_TENSORS[module]]].format(bid=block) + ".weight"

    def qk_row_order(self, param_name: str) -> torch.Tensor | None:
        """The row order llama.cpp stores this module's output rows in (None: as transformers does)."""
        module = _MODULE_NAME.match(param_name).group(2)
        if not self.permute_qk or module not in ("q_proj", "k_proj"):
            return None
        heads = self.num_heads if module == "q_proj" else self.num_kv_heads
        rows = self.module_shape(module)[0]
        # LlamaModel.permute applied to the row indices: within each head, the two rope halves interleave.
        return torch.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(rows)


def gguf_layout(model_name_or_path: str | None) -> GGUFLayout:
    """The layout of a model (hub id, folder, or None for the embedded default) from its config
    alone: no weights are loaded."""
    from model_loading import model_config, model_label

    return GGUFLayout.from_config(model_config(model_name_or_path), model_label(model_name_or_path))


def lora_tensors(diff, layout: GGUFLayout) -> dict[str, np.ndarray]:
    """{GGUF tensor name: float32 array} of a diff, every module checked against the model first."""
    planned = []
    for name in diff:
        tensor = layout.tensor_name(name)
        expected = layout.module_shape(_MODULE_NAME.match(name).group(2))
        if diff.shape(name) != expected:
            raise PersonaLoRAError(f"the persona diff does not fit {layout.model}: {name} is {diff.shape(name)} in the diff but "
                                   f"{expected} in the model (a diff for another model? pass --model)")
        planned.append((name, tensor))
    tensors = {}
    for name, tensor in planned:
        up, down = (factor.detach().to(torch.float32).cpu() for factor in diff.factors[name])
        order = layout.qk_row_order(name)
        if order is not None:
            up = up[order]
        tensors[f"{tensor}.lora_a"] = down.contiguous().numpy()
        tensors[f"{tensor}.lora_b"] = up.contiguous().numpy()
    return tensors


def write_lora_gguf(diff, path: str | os.PathLike, layout: GGUFLayout) -> Path:
    """Write ΔW as a GGUF LoRA adapter llama.cpp loads on the base model's GGUF (written to a
    temporary file and renamed, so a failure leaves nothing behind)."""
    import gguf

    tensors = lora_tensors(diff, layout)
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, layout.architecture)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_name(f"persona LoRA: {diff.metadata.get('trait') or 'diff'}")
        writer.add_string("persona_loras.base_model", layout.model)
        for key in ("trait", "provenance"):  # for a reader of the file; llama.cpp ignores them
            if diff.metadata.get(key):
                writer.add_string(f"persona_loras.{key}", str(diff.metadata[key]))
        for name, array in tensors.items():
            writer.add_tensor(name, array)
        _finish(writer)
    return Path(path)


def check_steering_vector(vector: torch.Tensor, layer: int, layout: GGUFLayout, flag: str = "--layer") -> None:
    from eval.activations import check_vector_shape

    check_vector_shape(vector, layout.num_layers, layout.hidden_size)
    if not 2 <= layer <= layout.num_layers - 1:
        raise PersonaLoRAError(f"{flag} {layer} cannot be exported: llama.cpp steers the outputs of blocks 1..{layout.num_layers - 1}, "
                               f"i.e. layers 2..{layout.num_layers} in Persona Vectors' numbering, and hidden_states["
                               f"{layout.num_layers}] is read after the final norm; choose a layer in 2..{layout.num_layers - 1}")


def write_control_vector_gguf(vector: torch.Tensor, layer: int, path: str | os.PathLike, layout: GGUFLayout) -> Path:
    """Write v[layer] as a llama.cpp control vector steering where ActivationSteerer at `layer` does."""
    check_steering_vector(vector, layer, layout)
    return write_directions({layer - 1: vector[layer]}, path, layout)


def write_directions(directions: dict[int, torch.Tensor], path: str | os.PathLike, layout: GGUFLayout) -> Path:
    """A control vector file as llama.cpp's cvector-generator writes one: direction.N (float32,
    [hidden]) is added to the output of block N."""
    import gguf

    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, "controlvector")
        writer.add_string("controlvector.model_hint", layout.architecture)
        writer.add_int32("controlvector.layer_count", len(directions))
        for block, direction in sorted(directions.items()):
            writer.add_tensor(f"direction.{block}", direction.detach().to(torch.float32).cpu().contiguous().numpy())
        _finish(writer)
    return Path(path)


def control_vector_buffer(path: str | os.PathLike, hidden_size: int, strength: float = 1.0) -> np.ndarray:
    """What llama.cpp's common_control_vector_load makes of a control vector file: the float32
    buffer for llama_set_adapter_cvec, block 1's slot first (direction.N at slot N−1, scaled by
    the strength). llama-cpp-python does not bind common, so the runtime check rebuilds it here,
    line for line from the pinned 0.3.36's vendor/llama.cpp: common/common.cpp (`dst = data +
    n_embd * (layer_idx - 1);  // layer 1 at [0]`, direction.0 refused) and src/llama-adapter.cpp
    (llama_adapter_cvec::apply: slot il−1 goes to block il, whose output it is added to)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    buffer = np.zeros(0, dtype=np.float32)
    for tensor in reader.tensors:
        block = int(tensor.name.split(".", 1)[1])
        if block < 1 or tensor.n_elements != hidden_size:
            raise PersonaLoRAError(f"{path}: {tensor.name} is not a direction llama.cpp accepts")
        buffer = np.pad(buffer, (0, max(0, block * hidden_size - buffer.size)))
        buffer[(block - 1) * hidden_size:block * hidden_size] += strength * np.asarray(tensor.data, dtype=np.float32).reshape(-1)
    return buffer


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
