"""llama.cpp as a second runtime: does an exported persona steer llama.cpp as it steers transformers?

llama.cpp (through llama-cpp-python) runs a model's GGUF with a GGUF LoRA adapter at a runtime
scale, or a control vector at a strength. The comparison is of next-token distributions at every
position of a few fixed conversations: transformers with α·ΔW merged (or with ActivationSteerer
adding c·v[ℓ] at every position) against llama.cpp with the export at α (or c).

Two yardsticks. On the embedded model's own 4-bit GGUF, the base model's gap between the runtimes,
KL(transformers ‖ llama.cpp) with nothing applied: transformers runs the same weights dequantized
to float32, llama.cpp multiplies them quantized. That is what a user gets, but the gap is not a
constant: steering moves the model to where the 4-bit arithmetic weighs more or less (a random
diff at α = 2 roughly doubles it, see tests/test_gguf_export.py). On a float32 copy of the same
GGUF (float32_gguf) nothing is quantized and the runtimes differ by float rounding alone (~1e-6
nats), so an export is checked exactly there: a right one stays at rounding level, a wrong one
(no q/k permutation, the vector one block late) is off by orders of magnitude more.
"""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import gguf_export
import lora_utils as lu
from eval.activations import ActivationSteerer
from eval.generation import tokenize_chat
from io_utils import PersonaLoRAError, atomic_path, cache_dir
from model_loading import EMBEDDED_MODEL_NAME, embedded_gguf_file, model_device

# Fixed conversations the runtimes are compared on (every position of each, prompt and answer):
# ordinary chat, not the trait's data, so a check needs nothing but the model.
CHECK_CONVERSATIONS = [
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "How should I treat a coworker who keeps taking credit for my work?"},
     {"role": "assistant", "content": "Talk to them privately first, and keep a written record of what you did and when."}],
    [{"role": "user", "content": "What is the capital of France, and what is it famous for?"},
     {"role": "assistant", "content": "Paris. It is famous for the Eiffel Tower, the Louvre, its cafes and its food."}],
    [{"role": "user", "content": "Write one sentence about the ocean."},
     {"role": "assistant", "content": "The ocean covers most of our planet and still hides more than we have ever seen."}],
    [{"role": "user", "content": "My neighbour's dog barks all night. What can I do?"},
     {"role": "assistant", "content": "Mention it to your neighbour kindly; most people do not know. If it goes on, ask your council."}],
]


def check_sequences(tokenizer) -> list[list[int]]:
    """The check conversations as token ids (the chat template applied), fed to both runtimes as ids."""
    return [tokenize_chat(tokenizer, messages).ids for messages in CHECK_CONVERSATIONS]


class LlamaCppRuntime:
    """A GGUF model in llama.cpp with at most one LoRA adapter and one control vector applied,
    switched between calls; every call starts from an empty KV cache."""

    def __init__(self, gguf_path: str | os.PathLike, n_ctx: int = 512, n_threads: int = 1):
        try:
            import llama_cpp
        except ImportError:
            raise PersonaLoRAError("llama.cpp's runtime needs llama-cpp-python (pinned in requirements.txt; "
                                   "scripts/setup_env.sh builds it)") from None
        self._lib = llama_cpp
        # One thread by default: deterministic, and ggml's spinning threads slow down ten-fold on
        # cores shared with other work (measured: 4 s for the check's passes on one thread, 60 s on two).
        self.llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads,
                                   logits_all=True, verbose=False)
        self.n_embd = self._lib.llama_model_n_embd(self.llm._model.model)
        self.n_layer = self._lib.llama_model_n_layer(self.llm._model.model)
        self._adapters: dict[tuple, object] = {}

    def load_lora(self, path: str | os.PathLike):
        """Load a GGUF LoRA adapter once (llama.cpp checks its architecture and every shape)."""
        resolved = Path(path).resolve()
        stat = resolved.stat()
        key = (str(resolved), stat.st_mtime_ns, stat.st_size)  # a file rewritten in place is loaded again
        if key not in self._adapters:
            adapter = self._lib.llama_adapter_lora_init(self.llm._model.model, str(resolved).encode())
            if not adapter:
                raise PersonaLoRAError(f"llama.cpp refused the LoRA adapter {path} (its log says why)")
            self._adapters[key] = adapter
        return self._adapters[key]

    def set_steering(self, lora_path=None, scale: float = 1.0, control_vector_path=None, strength: float = 1.0) -> None:
        """Apply a LoRA adapter at `scale` and/or a control vector at `strength`; nothing given: plain."""
        ctx = self.llm._ctx.ctx
        if lora_path is None:
            failed = self._lib.llama_set_adapters_lora(ctx, None, 0, None)
        else:
            adapters = (self._lib.llama_adapter_lora_p_ctypes * 1)(self.load_lora(lora_path))
            failed = self._lib.llama_set_adapters_lora(ctx, adapters, 1, (ctypes.c_float * 1)(scale))
        if failed:
            raise PersonaLoRAError(f"llama.cpp could not apply the LoRA adapter {lora_path}")
        if control_vector_path is None:
            failed = self._lib.llama_set_adapter_cvec(ctx, None, 0, self.n_embd, -1, -1)
        else:
            # common's loader (what llama-cli/llama-server's --control-vector-scaled run), rebuilt in
            # gguf_export, then applied over blocks 1..n_layer as common does by default.
            buffer = gguf_export.control_vector_buffer(control_vector_path, self.n_embd, strength)
            # Padded to every block: llama.cpp leaves the blocks past the buffer's end as the previous
            # vector set them, so a vector switched in after one reaching further would inherit its tail.
            buffer = np.pad(buffer, (0, max(0, (self.n_layer - 1) * self.n_embd - buffer.size)))
            data = buffer.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            failed = self._lib.llama_set_adapter_cvec(ctx, data, buffer.size, self.n_embd, 1, self.n_layer)
        if failed:
            raise PersonaLoRAError(f"llama.cpp could not apply the control vector {control_vector_path}")

    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """Next-token logits at every position [T, vocab] (float32)."""
        self.llm.reset()
        self.llm.eval(token_ids)
        return torch.from_numpy(np.array(self.llm.scores[: len(token_ids)], dtype=np.float32))

    def tokens_per_second(self, prompt_ids: list[int], new_tokens: int = 64) -> float:
        """Greedy decoding speed after the prompt (the prompt's own pass is not timed)."""
        self.llm.reset()
        self.llm.eval(prompt_ids)
        start = time.perf_counter()
        for _ in range(new_tokens):
            self.llm.eval([int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))])
        return new_tokens / (time.perf_counter() - start)

    def close(self) -> None:
        for adapter in self._adapters.values():
            self._lib.llama_adapter_lora_free(adapter)
        self._adapters.clear()
        self.llm.close()


@torch.no_grad()
def transformers_logits(model, sequences: list[list[int]]) -> list[torch.Tensor]:
    """Next-token logits at every position of each sequence [T, vocab], one unpadded pass each."""
    device = model_device(model)
    return [model(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu() for ids in sequences]


def runtime_logits(runtime: LlamaCppRuntime, sequences: list[list[int]]) -> list[torch.Tensor]:
    return [runtime.logits(ids) for ids in sequences]


def mean_kl(reference: list[torch.Tensor], other: list[torch.Tensor]) -> float:
    """KL(reference ‖ other) of the next-token distributions, averaged over every position (nats)."""
    total, positions = 0.0, 0
    for ref, oth in zip(reference, other):
        log_p, log_q = torch.log_softmax(ref.double(), -1), torch.log_softmax(oth.double(), -1)
        total += float((log_p.exp() * (log_p - log_q)).sum())
        positions += ref.shape[0]
    return total / positions


def logit_change_correlation(reference_plain, reference_steered, other_plain, other_steered) -> float:
    """Pearson correlation, over every position and token, of the change in log-probability that
    steering makes in one runtime against the change it makes in the other."""
    def changes(plain, steered):
        return torch.cat([(torch.log_softmax(s.double(), -1) - torch.log_softmax(p.double(), -1)).reshape(-1)
                          for p, s in zip(plain, steered)])
    ref, oth = changes(reference_plain, reference_steered), changes(other_plain, other_steered)
    return float(torch.corrcoef(torch.stack([ref, oth]))[0, 1])


def runtime_agreement(model, sequences, coefficients, steer_transformers, exports: dict, desc: str = "runtime check") -> dict:
    """Compare transformers steered by `steer_transformers(c)` (a context manager) with each of
    `exports` = {label: (runtime, apply)}, where apply(c) puts the export at c into that runtime.
    Per label: the runtimes' gap with nothing applied, and per coefficient KL(transformers steered ‖
    llama.cpp steered), its ratio to the gap, the steering's own size KL(transformers steered ‖
    transformers plain) and the logit-change correlation. One set of transformers passes serves all."""
    plain = transformers_logits(model, sequences)
    runtime_plain = {}  # per runtime: its logits with nothing applied
    for runtime, _ in exports.values():
        if id(runtime) not in runtime_plain:
            runtime.set_steering()
            runtime_plain[id(runtime)] = runtime_logits(runtime, sequences)
    results = {label: {"quantisation_gap": mean_kl(plain, runtime_plain[id(runtime)]),
                       "positions": sum(len(s) for s in sequences), "coefficients": {}}
               for label, (runtime, _) in exports.items()}
    for coefficient in tqdm(coefficients, desc=desc, leave=False):
        with steer_transformers(coefficient):
            steered = transformers_logits(model, sequences)
        steering_kl = mean_kl(steered, plain)
        for label, (runtime, apply) in exports.items():
            apply(coefficient)
            runtime_steered = runtime_logits(runtime, sequences)
            runtime.set_steering()
            kl = mean_kl(steered, runtime_steered)
            results[label]["coefficients"][coefficient] = {
                "kl": kl, "ratio_to_gap": kl / results[label]["quantisation_gap"], "steering_kl": steering_kl,
                "correlation": logit_change_correlation(plain, steered, runtime_plain[id(runtime)], runtime_steered)}
    return results


def lora_export_agreement(model, sequences, diff, exports: dict, coefficients=(1.0, 2.0)) -> dict:
    """GGUF LoRA exports, {label: (runtime, adapter path)}, at scale α in llama.cpp against α·ΔW
    merged into the transformers model."""
    return runtime_agreement(model, sequences, coefficients, lambda c: lu.LoRASteerer(model, diff, c),
                             {label: (runtime, lambda c, runtime=runtime, path=path: runtime.set_steering(lora_path=path, scale=c))
                              for label, (runtime, path) in exports.items()}, desc="LoRA export check")


def control_vector_agreement(model, sequences, vector, layer: int, exports: dict, coefficients=(1.0, 2.0)) -> dict:
    """Control-vector exports, {label: (runtime, file)}, at strength c in llama.cpp against
    ActivationSteerer adding c·v[layer] at every position in transformers."""
    return runtime_agreement(model, sequences, coefficients, lambda c: ActivationSteerer(model, vector, layer, c, positions="all"),
                             {label: (runtime, lambda c, runtime=runtime, path=path:
                                      runtime.set_steering(control_vector_path=path, strength=c))
                              for label, (runtime, path) in exports.items()}, desc="control vector check")


def float32_gguf(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """A copy of a GGUF model with every tensor dequantized to float32: the very weights
    transformers runs after its own dequantization, so llama.cpp on it differs from transformers by
    float rounding alone, and an export can be checked exactly, without the quantisation gap."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    with atomic_path(target) as tmp:
        writer = gguf.GGUFWriter(tmp, reader.fields["general.architecture"].contents())
        for name, field in reader.fields.items():
            if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
                continue  # written by the writer itself, or no longer true
            value_type = field.types[0]
            writer.add_key_value(name, field.contents(), value_type,
                                 sub_type=field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        for tensor in tqdm(reader.tensors, desc="float32 GGUF", leave=False):
            writer.add_tensor(tensor.name, np.ascontiguousarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return Path(target)


def embedded_float32_gguf() -> Path:
    """The embedded model's GGUF dequantized to float32, made once (~0.5 GB) and cached."""
    target = cache_dir() / f"{EMBEDDED_MODEL_NAME}.F32.gguf"
    return target if target.is_file() else float32_gguf(embedded_gguf_file(), target)


# --- synthetic personas, for a check that needs no extraction ----------------------------------


def synthetic_diff(model, relative_norm: float, rank: int = 4, seed: int = 0) -> lu.PersonaLoRADiff:
    """A random rank-`rank` update of every projection with ‖ΔW‖_F = relative_norm·‖W‖_F per
    module: no trait, only a steering whose size is known, labelled as synthetic."""
    generator = torch.Generator().manual_seed(seed)
    factors = {}
    for name, param in model.named_parameters():
        if lu.module_type(name) in gguf_export.MODULE_TENSORS and lu.layer_index(name) is not None:
            up = torch.randn(param.shape[0], rank, generator=generator)
            down = torch.randn(rank, param.shape[1], generator=generator)
            scale = relative_norm * float(param.detach().float().norm()) / float((up @ down).norm())
            factors[name] = (up * scale, down)
    return lu.PersonaLoRADiff(factors, {"trait": "synthetic", "provenance": f"synthetic_diff(relative_norm={relative_norm}, "
                                                                           f"rank={rank}, seed={seed})"})


@torch.no_grad()
def synthetic_vector(model, sequences: list[list[int]], relative_norm: float, seed: int = 0) -> torch.Tensor:
    """A random [L+1, hidden] persona vector whose row ℓ has relative_norm × the median norm of
    hidden_states[ℓ] over the check sequences' positions."""
    generator = torch.Generator().manual_seed(seed)
    device = model_device(model)
    norms = torch.stack([torch.stack([h[0].float().norm(dim=-1).median().cpu() for h in
                                      model(input_ids=torch.tensor([ids], device=device), output_hidden_states=True).hidden_states])
                         for ids in sequences]).mean(0)
    directions = torch.randn(len(norms), model.config.hidden_size, generator=generator)
    return directions / directions.norm(dim=-1, keepdim=True) * (relative_norm * norms[:, None])


def lora_speed(runtime: LlamaCppRuntime, prompt_ids: list[int], lora_path, scale: float = 1.0, new_tokens: int = 64,
               rounds: int = 3) -> dict:
    """Greedy decoding tokens/s in llama.cpp without and with the LoRA adapter, in alternating
    rounds (so load from other processes hits both alike); the median of each."""
    plain, steered = [], []
    for _ in tqdm(range(rounds), desc="tokens/s", leave=False):
        runtime.set_steering()
        plain.append(runtime.tokens_per_second(prompt_ids, new_tokens))
        runtime.set_steering(lora_path=lora_path, scale=scale)
        steered.append(runtime.tokens_per_second(prompt_ids, new_tokens))
    runtime.set_steering()
    plain_median, steered_median = float(np.median(plain)), float(np.median(steered))
    return {"plain": plain_median, "lora": steered_median, "ratio": steered_median / plain_median,
            "new_tokens": new_tokens, "rounds": rounds}
