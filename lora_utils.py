"""Persona LoRAs in weight space: the diff object, merging, steering and projections.

The weight-space math of the project lives here, and a notebook that imports this module behaves
exactly like the scripts (run plumbing is in io_utils.py, model loading in model_loading.py; the
names a notebook needs from them are importable from here too). The math:

    ΔW = s_p·B_p·A_p − s_n·B_n·A_n = [s_p·B_p | −s_n·B_n] · [A_p ; A_n]      (exact, rank ≤ 2r)

A diff is kept as factors (B: out × k, A: k × in) per module, keyed by the model's own parameter
names (``model.layers.3.self_attn.q_proj.weight``). Every inner product and norm below is
computed from the factors; a dense ΔW is formed only one module at a time, when merging.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import numbers
import os
import pickle
import re
import sys
import time
import weakref
import zlib
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import torch

import gguf_export
from io_utils import PersonaLoRAError, atomic_path, read_json_object

# Re-exported for notebooks and the README's API: `lu.load_model_and_tokenizer()`.
from model_loading import load_model_and_tokenizer  # noqa: F401

DIFF_FORMAT = "persona_lora_diff"
DIFF_FORMAT_VERSION = 1
_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------


def layer_index(param_name: str) -> int | None:
    match = _LAYER_INDEX.search(param_name)
    return int(match.group(1)) if match else None


def module_type(param_name: str) -> str:
    """'model.layers.3.self_attn.q_proj.weight' -> 'q_proj'."""
    parts = param_name.split(".")
    return parts[-2] if parts[-1] == "weight" else parts[-1]


def _peft_key_to_param_name(key: str) -> tuple[str, str] | None:
    """'base_model.model.model.layers.0.self_attn.q_proj.lora_A[.default].weight'
    -> ('model.layers.0.self_attn.q_proj.weight', 'A')."""
    match = re.match(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$", key)
    if not match:
        return None
    return f"{match.group(1)}.weight", match.group(2)


# ---------------------------------------------------------------------------------------------
# The persona LoRA diff
# ---------------------------------------------------------------------------------------------


def _check_factors(name: str, up: torch.Tensor, down: torch.Tensor) -> None:
    if not (isinstance(up, torch.Tensor) and isinstance(down, torch.Tensor)):
        raise PersonaLoRAError(f"module {name}: the factors B and A must be tensors, not {type(up).__name__} and {type(down).__name__}")
    if not (up.is_floating_point() and down.is_floating_point()):
        raise PersonaLoRAError(f"module {name}: the factors must be floating-point tensors, not {up.dtype} and {down.dtype}")
    if up.ndim != 2 or down.ndim != 2 or up.shape[1] != down.shape[0]:
        raise PersonaLoRAError(
            f"module {name}: factors of shapes {tuple(up.shape)} and {tuple(down.shape)} "
            "do not multiply (need B: out × k and A: k × in)"
        )


class PersonaLoRADiff:
    """An exact low-rank weight update ΔW = B·A per module, with arithmetic.

    ``1.5 * evil - 0.5 * sycophancy`` is again a PersonaLoRADiff: scaling multiplies B, and
    sums concatenate the factors ([B₁ | B₂]·[A₁ ; A₂]), so composition stays exact and low-rank.
    """

    def __init__(self, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], metadata: dict | None = None):
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, (up, down) in factors.items():
            _check_factors(name, up, down)
            self.factors[name] = (up, down)
        self.metadata = dict(metadata or {})

    # --- inspection -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.factors)

    def __contains__(self, name: str) -> bool:
        return name in self.factors

    def __iter__(self) -> Iterator[str]:
        return iter(self.factors)

    def __repr__(self) -> str:
        ranks = sorted({self.rank(name) for name in self.factors})
        trait = self.metadata.get("trait", "?")
        return f"PersonaLoRADiff(trait={trait!r}, modules={len(self)}, ranks={ranks}, norm={self.norm():.4g})"

    @property
    def module_names(self) -> list[str]:
        return list(self.factors)

    def rank(self, name: str) -> int:
        return self.factors[name][0].shape[1]

    def shape(self, name: str) -> tuple[int, int]:
        up, down = self.factors[name]
        return up.shape[0], down.shape[1]

    def layers(self) -> list[int]:
        return sorted({i for i in map(layer_index, self.factors) if i is not None})

    def delta(self, name: str, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        """The dense ΔW of one module (out × in)."""
        up, down = self.factors[name]
        return up.to(device=device, dtype=dtype) @ down.to(device=device, dtype=dtype)

    def first_non_finite(self) -> str | None:
        for name, (up, down) in self.factors.items():
            if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
                return name
        return None

    # --- arithmetic -------------------------------------------------------------------------
    def __mul__(self, scalar) -> "PersonaLoRADiff":
        if not isinstance(scalar, (int, float)) or isinstance(scalar, bool):
            return NotImplemented
        return PersonaLoRADiff(
            {name: (up * scalar, down) for name, (up, down) in self.factors.items()},
            {**self.metadata, "provenance": f"{scalar} * ({self.metadata.get('provenance', self._label())})"},
        )

    __rmul__ = __mul__

    def __truediv__(self, scalar) -> "PersonaLoRADiff":
        return self * (1.0 / scalar)

    def __neg__(self) -> "PersonaLoRADiff":
        return self * -1.0

    def __add__(self, other: "PersonaLoRADiff") -> "PersonaLoRADiff":
        if not isinstance(other, PersonaLoRADiff):
            return NotImplemented
        factors = dict(self.factors)
        for name, (up, down) in other.factors.items():
            if name in factors:
                if self.shape(name) != other.shape(name):
                    raise PersonaLoRAError(
                        f"cannot add diffs: module {name} has shape {self.shape(name)} in one and "
                        f"{other.shape(name)} in the other (diffs for different models?)"
                    )
                mine_up, mine_down = factors[name]
                dtype = torch.promote_types(mine_up.dtype, up.dtype)
                factors[name] = (
                    torch.cat([mine_up.to(dtype), up.to(dtype)], dim=1),
                    torch.cat([mine_down.to(dtype), down.to(dtype)], dim=0),
                )
            else:
                factors[name] = (up, down)
        metadata = {k: v for k, v in self.metadata.items() if other.metadata.get(k) == v}
        metadata["provenance"] = f"({self.metadata.get('provenance', self._label())}) + ({other.metadata.get('provenance', other._label())})"
        return PersonaLoRADiff(factors, metadata)

    def __sub__(self, other: "PersonaLoRADiff") -> "PersonaLoRADiff":
        if not isinstance(other, PersonaLoRADiff):
            return NotImplemented
        return self + (-1.0) * other

    def _label(self) -> str:
        return str(self.metadata.get("trait", "diff"))

    # --- inner products and norms from the factors (never forming B·A) ----------------------
    def inner(self, other: "PersonaLoRADiff") -> float:
        """⟨self, other⟩_F summed over the modules both touch."""
        return sum(self.module_inner(name, other) for name in self.factors if name in other.factors)

    def module_inner(self, name: str, other: "PersonaLoRADiff") -> float:
        return lowrank_inner(*self.factors[name], *other.factors[name])

    def module_sq_norm(self, name: str) -> float:
        return lowrank_inner(*self.factors[name], *self.factors[name])

    def module_norm(self, name: str) -> float:
        return math.sqrt(max(self.module_sq_norm(name), 0.0))

    def norm(self) -> float:
        return math.sqrt(max(sum(self.module_sq_norm(name) for name in self.factors), 0.0))

    def layer_norms(self) -> dict[int, float]:
        """‖ΔW‖_F per transformer layer (modules outside any layer are left out)."""
        squares: dict[int, float] = {}
        for name in self.factors:
            index = layer_index(name)
            if index is not None:
                squares[index] = squares.get(index, 0.0) + self.module_sq_norm(name)
        return {index: math.sqrt(max(value, 0.0)) for index, value in sorted(squares.items())}

    def cosine(self, other: "PersonaLoRADiff") -> float:
        return self.inner(other) / (self.norm() * other.norm() + 1e-30)

    def module_cosines(self, other: "PersonaLoRADiff") -> dict:
        """The cosine of the two dense updates within each module both touch, and their
        distribution (quantiles of the cosine and of its magnitude, over modules). A whole-space
        cosine is one number dominated by the largest modules, and near 0 for any two independently
        initialised adapters whatever they learned; the per-module distribution shows where two
        updates agree, if anywhere. Modules where either update is zero have no cosine and are left
        out (counted)."""
        import numpy as np

        by_module = {}
        for name in self.factors:
            if name in other.factors:
                scale = self.module_norm(name) * other.module_norm(name)
                if scale > 0:
                    by_module[name] = self.module_inner(name, other) / scale
        values = np.array(list(by_module.values()))
        quantiles = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)

        def spread(array) -> dict:
            return {f"q{round(100 * q)}": float(np.quantile(array, q)) for q in quantiles} if len(array) else None

        return {"by_module": by_module, "modules": len(by_module),
                "modules_without_cosine": sum(name in other.factors for name in self.factors) - len(by_module),
                "cosine_quantiles": spread(values), "abs_cosine_quantiles": spread(np.abs(values)),
                "mean_abs_cosine": float(np.abs(values).mean()) if len(values) else None}

    # --- spectra and compression ------------------------------------------------------------
    def svd(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Thin SVD of ΔW = U·diag(S)·Vᵀ from the factors: QR of B and of Aᵀ, SVD of the k × k core."""
        up, down = (t.to(torch.float64) for t in self.factors[name])
        q_up, r_up = torch.linalg.qr(up)
        q_down, r_down = torch.linalg.qr(down.T)
        u_core, singular, vh_core = torch.linalg.svd(r_up @ r_down.T)
        return q_up @ u_core, singular, (q_down @ vh_core.T).T

    def singular_values(self, name: str) -> torch.Tensor:
        return self.svd(name)[1]

    def compress(self, rank: int) -> "PersonaLoRADiff":
        """Best rank-`rank` approximation per module (Eckart–Young). The energy kept, Σσ²
        retained over Σσ² in total, is reported in metadata['compression']."""
        if rank < 1:
            raise PersonaLoRAError(f"compress(rank={rank}): rank must be at least 1")
        factors, kept, total = {}, 0.0, 0.0
        for name, (up, _) in self.factors.items():
            u, s, vh = self.svd(name)
            keep = min(rank, s.numel())
            factors[name] = ((u[:, :keep] * s[:keep]).to(up.dtype), vh[:keep].to(up.dtype))
            kept += float((s[:keep] ** 2).sum())
            total += float((s**2).sum())
        energy = kept / total if total > 0 else 1.0
        metadata = {**self.metadata, "compression": {"rank": rank, "energy_kept": energy}}
        return PersonaLoRADiff(factors, metadata)

    # --- saving, loading, exporting --------------------------------------------------------
    def to_state(self) -> dict:
        return {
            "format": DIFF_FORMAT,
            "version": DIFF_FORMAT_VERSION,
            "metadata": json.loads(json.dumps(self.metadata, default=str)),
            "factors": {name: {"B": up.contiguous(), "A": down.contiguous()} for name, (up, down) in self.factors.items()},
        }

    def save(self, path: str | os.PathLike, safetensors_twin: bool = True) -> Path:
        """Write `path` (.pt, loadable with torch.load(weights_only=True)) and a .safetensors twin."""
        path = Path(path)
        with atomic_path(path) as tmp:
            torch.save(self.to_state(), tmp)
        if safetensors_twin:
            from safetensors.torch import save_file

            tensors = {}
            for name, (up, down) in self.factors.items():
                tensors[f"{name}::B"] = up.contiguous()
                tensors[f"{name}::A"] = down.contiguous()
            header = {"format": DIFF_FORMAT, "version": str(DIFF_FORMAT_VERSION), "metadata": json.dumps(self.metadata, default=str)}
            with atomic_path(path.with_suffix(".safetensors")) as tmp:
                save_file(tensors, str(tmp), metadata=header)
        return path

    def to_peft_adapter(self, output_dir: str | os.PathLike, coefficient: float = 1.0, base_model_name_or_path: str | None = None) -> Path:
        """Export coefficient·ΔW as a standard PEFT LoRA adapter folder.

        Each module gets rank k (its factor width) and lora_alpha = k, so PEFT's scale is 1 and
        B·A is exactly coefficient·ΔW. PEFT, vLLM or any LoRA-serving engine can then serve the
        steered model without this code. An existing folder is replaced only if it is empty or an
        earlier export of a diff (persona_lora.json beside the adapter): anything else, a trained
        finetune included, is refused, never deleted.
        """
        from peft import LoraConfig
        from safetensors.torch import save_file

        if not math.isfinite(coefficient):
            raise PersonaLoRAError(f"coefficient {coefficient} is not a finite number")
        output_dir = Path(output_dir)
        if output_dir.exists() and not (output_dir.is_dir() and ((output_dir / "persona_lora.json").is_file()
                                                                 or not any(output_dir.iterdir()))):
            raise PersonaLoRAError(f"{output_dir} exists and is not an earlier export of a persona diff: it would be replaced "
                                   "whole; choose a new folder for the adapter")
        module_names = [name.removesuffix(".weight") for name in self.factors]
        ranks = {name.removesuffix(".weight"): self.rank(name) for name in self.factors}
        default_rank = max(ranks.values())
        # PEFT matches pattern keys as regexes on the module name; anchor them so that
        # 'layers.1.' never also matches 'layers.11.'.
        pattern = {f"^{re.escape(module)}": rank for module, rank in ranks.items() if rank != default_rank}
        config = LoraConfig(
            r=default_rank,
            lora_alpha=default_rank,
            target_modules=module_names,
            rank_pattern=pattern,
            alpha_pattern=dict(pattern),
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
            base_model_name_or_path=base_model_name_or_path or self.metadata.get("base_model"),
        )
        tensors = {}
        for name, (up, down) in self.factors.items():
            module = name.removesuffix(".weight")
            tensors[f"base_model.model.{module}.lora_A.weight"] = down.float().contiguous()
            tensors[f"base_model.model.{module}.lora_B.weight"] = (up.float() * coefficient).contiguous()
        with atomic_path(output_dir) as tmp:
            tmp.mkdir()
            config.save_pretrained(str(tmp))
            save_file(tensors, str(tmp / "adapter_model.safetensors"))
            (tmp / "persona_lora.json").write_text(
                json.dumps({"coefficient": coefficient, "metadata": self.metadata}, indent=2, default=str) + "\n"
            )
        return output_dir

    def to_gguf(self, path: str | os.PathLike, model: "str | None | gguf_export.GGUFLayout" = None) -> Path:
        """Export ΔW as a GGUF LoRA adapter for llama.cpp / llama-server / Ollama on `model`'s GGUF
        (hub id, folder, None for the embedded default, or a GGUFLayout). Tensor names and the q/k
        row permutation come from the model's config; no coefficient is baked in: the runtime's
        LoRA scale is α. Every module is checked against the model before anything is written."""
        layout = model if isinstance(model, gguf_export.GGUFLayout) else gguf_export.gguf_layout(model)
        return gguf_export.write_lora_gguf(self, path, layout)


def lowrank_inner(up1: torch.Tensor, down1: torch.Tensor, up2: torch.Tensor, down2: torch.Tensor) -> float:
    """⟨B₁A₁, B₂A₂⟩_F = sum((B₁ᵀB₂) ⊙ (A₁A₂ᵀ)), O(k₁·k₂·(in+out)), in float64."""
    up1, down1, up2, down2 = (t.to(torch.float64) for t in (up1, down1, up2.to(up1.device), down2.to(up1.device)))
    return float(((up1.T @ up2) * (down1 @ down2.T)).sum())


def dense_lowrank_inner(dense: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> float:
    """⟨D, B·A⟩_F = sum((Bᵀ·D) ⊙ A), without forming B·A."""
    dense = dense.to(torch.float64)
    up, down = up.to(device=dense.device, dtype=torch.float64), down.to(device=dense.device, dtype=torch.float64)
    return float(((up.T @ dense) * down).sum())


def _read_state(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            if header.get("format") != DIFF_FORMAT:
                raise PersonaLoRAError(f"{path} is a safetensors file but not a persona LoRA diff (no '{DIFF_FORMAT}' header)")
            factors: dict[str, dict] = {}
            for key in handle.keys():
                name, part = key.rsplit("::", 1)
                factors.setdefault(name, {})[part] = handle.get_tensor(key)
        return {"format": DIFF_FORMAT, "metadata": json.loads(header.get("metadata", "{}")), "factors": factors}
    return torch.load(path, map_location="cpu", weights_only=True)


def load_lora_diff(path: str | os.PathLike) -> PersonaLoRADiff:
    """Load a diff written by PersonaLoRADiff.save (.pt or its .safetensors twin)."""
    path = Path(path)
    if not path.is_file():
        raise PersonaLoRAError(
            f"persona LoRA diff not found: {path} (make one with: python extract_persona_lora.py --trait TRAIT --output_dir DIR)"
        )
    try:
        state = _read_state(path)
    except PersonaLoRAError:
        raise
    except pickle.UnpicklingError as error:
        if "global" not in str(error).lower():  # not a pickle of Python objects: a corrupt or foreign file
            raise PersonaLoRAError(f"cannot read persona LoRA diff {path} (not a file torch.save wrote); "
                                   "re-create it with extract_persona_lora.py") from None
        # torch.load(weights_only=True) met Python objects other than tensors: they were not run.
        raise PersonaLoRAError(f"{path} is not a persona LoRA diff and was not loaded: it holds Python objects other than "
                               "tensors, and unpickling them could run code. Re-create it with extract_persona_lora.py") from None
    except Exception as error:  # a truncated or foreign file: say which file and what it should be
        first_line = (str(error).strip().splitlines() or [""])[0][:200]
        raise PersonaLoRAError(f"cannot read persona LoRA diff {path} ({type(error).__name__}: {first_line}); "
                               "re-create it with extract_persona_lora.py") from None
    if not isinstance(state, dict) or state.get("format") != DIFF_FORMAT or not isinstance(state.get("factors"), dict):
        raise PersonaLoRAError(f"{path} is not a persona LoRA diff (expected a file written by PersonaLoRADiff.save)")
    factors = {}
    for name, parts in state["factors"].items():
        if not isinstance(parts, dict) or set(parts) != {"A", "B"}:
            raise PersonaLoRAError(f"{path}: module {name} does not have exactly the factors A and B")
        factors[name] = (parts["B"], parts["A"])
    try:
        diff = PersonaLoRADiff(factors, state.get("metadata") if isinstance(state.get("metadata"), dict) else {})
    except PersonaLoRAError as error:
        raise PersonaLoRAError(f"{path}: {error}") from None
    bad = diff.first_non_finite()  # refused on load, so a script says so before it loads a model
    if bad is not None:
        raise PersonaLoRAError(f"{path}: the persona diff has non-finite values (NaN or inf) in {bad}; re-create it")
    diff.metadata.setdefault("source_path", str(path))
    return diff


def _as_diff(diff_or_path) -> PersonaLoRADiff:
    return diff_or_path if isinstance(diff_or_path, PersonaLoRADiff) else load_lora_diff(diff_or_path)


# ---------------------------------------------------------------------------------------------
# Full checkpoints, read one tensor at a time
# ---------------------------------------------------------------------------------------------


class SafetensorsCheckpoint:
    """Tensor-by-tensor access to a (sharded) safetensors checkpoint through memory maps."""

    def __init__(self, folder: Path):
        self.folder = folder
        index_path = folder / "model.safetensors.index.json"
        if index_path.is_file():
            weight_map = json.loads(index_path.read_text())["weight_map"]
        elif (folder / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
                weight_map = {key: "model.safetensors" for key in handle.keys()}
        else:
            raise PersonaLoRAError(f"{folder} has no model.safetensors (or index): not a safetensors checkpoint or PEFT adapter")
        self.weight_map = weight_map
        self._handles = {}
        config_path = folder / "config.json"
        self.config = json.loads(config_path.read_text()) if config_path.is_file() else {}

    def _handle(self, filename: str):
        from safetensors import safe_open

        if filename not in self._handles:
            self._handles[filename] = safe_open(str(self.folder / filename), framework="pt")
        return self._handles[filename]

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self.weight_map[name]).get_slice(name).get_shape())

    def tensor(self, name: str) -> torch.Tensor:
        return self._handle(self.weight_map[name]).get_tensor(name)

    def nbytes(self) -> int:
        return sum((self.folder / f).stat().st_size for f in set(self.weight_map.values()))

    def norm(self, name: str) -> float:
        """‖W‖_F of one tensor, read through the memory map."""
        return float(self.tensor(name).float().norm())


# ---------------------------------------------------------------------------------------------
# PEFT adapters -> exact low-rank updates
# ---------------------------------------------------------------------------------------------


def _pattern_value(patterns: Mapping[str, float], module_name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return patterns[key]
    return default


def load_adapter_update(adapter_dir: str | os.PathLike) -> PersonaLoRADiff:
    """A PEFT LoRA adapter folder as its exact update s·B·A per module (s = α/r, or α/√r with rsLoRA).

    The scale is folded into B, so the result needs no base weights and no PEFT model.
    """
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise PersonaLoRAError(f"{adapter_dir} is not a PEFT adapter folder (no adapter_config.json)")
    config = read_json_object(config_path, "adapter config")
    if config.get("peft_type", "LORA") != "LORA":
        raise PersonaLoRAError(f"{config_path}: peft_type {config.get('peft_type')} is not a LoRA adapter")
    if config.get("use_dora"):
        raise PersonaLoRAError(f"{config_path}: DoRA adapters are not linear in B·A and cannot be turned into a persona diff")
    weights_path = adapter_dir / "adapter_model.safetensors"
    try:
        if weights_path.is_file():
            from safetensors.torch import load_file

            state = load_file(str(weights_path))
        elif (adapter_dir / "adapter_model.bin").is_file():
            weights_path = adapter_dir / "adapter_model.bin"
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
        else:
            raise PersonaLoRAError(f"{adapter_dir} has no adapter_model.safetensors (or .bin)")
    except PersonaLoRAError:
        raise
    except Exception as error:
        raise PersonaLoRAError(f"cannot read adapter weights {weights_path}: {type(error).__name__}: {error}") from None

    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        parsed = _peft_key_to_param_name(key)
        if parsed is None:
            if "lora_embedding" in key or "lora_magnitude" in key:
                raise PersonaLoRAError(f"{weights_path}: {key} is not a linear LoRA factor (embedding LoRA and DoRA are unsupported)")
            continue  # e.g. modules_to_save copies: not part of the low-rank update
        name, part = parsed
        halves.setdefault(name, {})[part] = tensor
    if not halves:
        raise PersonaLoRAError(f"{weights_path} holds no LoRA factors")

    rank_default, alpha_default = config.get("r", 8), config.get("lora_alpha", 8)
    factors, scales = {}, {}
    for name, parts in halves.items():
        if set(parts) != {"A", "B"}:
            raise PersonaLoRAError(f"{weights_path}: module {name} has lora_{next(iter(parts))} but not its partner")
        module = name.removesuffix(".weight")
        rank = _pattern_value(config.get("rank_pattern") or {}, module, rank_default)
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, alpha_default)
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        up, down = parts["B"].float() * scale, parts["A"].float()
        if config.get("fan_in_fan_out"):  # Conv1D-style weights are stored transposed: ΔWᵀ = Aᵀ·Bᵀ
            up, down = down.T.contiguous(), up.T.contiguous()
        factors[name] = (up, down)
        scales[name] = scale
    metadata = {
        "base_model": config.get("base_model_name_or_path"),
        "adapter_dir": str(adapter_dir),
        "rank": rank_default,
        "lora_alpha": alpha_default,
        "use_rslora": bool(config.get("use_rslora")),
        "target_modules": sorted({module_type(n) for n in factors}),
        "scales": sorted(set(scales.values())),
    }
    return PersonaLoRADiff(factors, metadata)


def compute_persona_lora_diff(pos_lora_dir: str | os.PathLike, neg_lora_dir: str | os.PathLike, trait: str | None = None) -> PersonaLoRADiff:
    """ΔW = s_p·B_p·A_p − s_n·B_n·A_n for every module, exact and low-rank (rank ≤ r_p + r_n).

    The two adapters must touch the same modules with the same shapes; the first mismatch is
    named. (Subtracting the factors, (B_p − B_n)(A_p − A_n), would be wrong: it is not ΔW.)
    """
    pos, neg = load_adapter_update(pos_lora_dir), load_adapter_update(neg_lora_dir)
    only_pos, only_neg = sorted(set(pos) - set(neg)), sorted(set(neg) - set(pos))
    if only_pos or only_neg:
        first = (only_pos or only_neg)[0]
        side = pos_lora_dir if only_pos else neg_lora_dir
        raise PersonaLoRAError(f"adapters disagree: module {first} is only in {side}; train both with the same target modules")
    for name in pos:
        if pos.shape(name) != neg.shape(name):
            raise PersonaLoRAError(
                f"adapters disagree: module {name} is {pos.shape(name)} in {pos_lora_dir} but {neg.shape(name)} in {neg_lora_dir}"
            )
    if pos.metadata.get("base_model") != neg.metadata.get("base_model"):
        print(
            f"warning: adapters name different base models ({pos.metadata.get('base_model')} vs "
            f"{neg.metadata.get('base_model')}); shapes match, continuing",
            file=sys.stderr,
        )
    diff = pos - neg
    diff.metadata = {
        "trait": trait,
        "base_model": pos.metadata.get("base_model"),
        "rank": pos.metadata["rank"],
        "diff_rank": max(diff.rank(n) for n in diff),
        "lora_alpha": pos.metadata["lora_alpha"],
        "use_rslora": pos.metadata["use_rslora"],
        "target_modules": pos.metadata["target_modules"],
        "pos_lora_dir": str(pos_lora_dir),
        "neg_lora_dir": str(neg_lora_dir),
        "pos_scales": pos.metadata["scales"],
        "neg_scales": neg.metadata["scales"],
        "provenance": "s_p·B_p·A_p − s_n·B_n·A_n (compute_persona_lora_diff)",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    return diff


# ---------------------------------------------------------------------------------------------
# Merging in place, and restoring bit-exactly
# ---------------------------------------------------------------------------------------------


MAX_UPDATE_TO_WEIGHT_RATIO = 10.0
FIDELITY_WARNING = 0.95
_FIDELITY_WARNED: list[bool] = []  # one warning per process is enough


def as_coefficient(value, what: str = "coefficient") -> float:
    """A finite real coefficient from a number or a one-element tensor; anything else is refused."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise PersonaLoRAError(f"{what} {value!r} is not a finite number")
    return float(value)


def check_coefficient_size(diff: PersonaLoRADiff, coefficient: float, weight_norm, dtype: torch.dtype,
                           what: str = "coefficient") -> None:
    """Refuse a coefficient whose merged update dwarfs a module's weights (it can only destroy the
    model) or overflows their dtype. `weight_norm(module name)` gives ‖W‖_F of the unmerged weight."""
    if coefficient == 0:
        return
    limit = torch.finfo(dtype).max
    for name in diff:
        update_norm = abs(coefficient) * diff.module_norm(name)
        norm = weight_norm(name)
        if update_norm > MAX_UPDATE_TO_WEIGHT_RATIO * norm or update_norm >= limit:
            ratio = update_norm / norm if norm > 0 else float("inf")
            raise PersonaLoRAError(
                f"{what} {coefficient:g} is out of range: the merged update of {name} would be {ratio:.3g}× the weight's "
                f"own norm (at most {MAX_UPDATE_TO_WEIGHT_RATIO:g}× is accepted; useful persona coefficients keep it far below 1)")


def check_diff_fits(lora_diff, weights, coefficients: Iterable = (), what: str = "coefficient",
                    dtype: torch.dtype | None = None, weight_norm=None) -> dict[str, str]:
    """The one check that a persona diff fits a model, before anything is merged or loaded.

    `weights` is a loaded model (a PEFT wrapper around it is tolerated) or a SafetensorsCheckpoint
    (read through memory maps, so a script can refuse before the model loads). Refuses, in one line,
    non-finite values, a module the model lacks or has in another shape, and each coefficient that
    is not a finite number or whose update would dwarf the weights (check_coefficient_size).
    `weight_norm(parameter name)` overrides how ‖W‖ is read (LoRAMerger reads its backups).
    Returns {diff module: the model's parameter name}."""
    diff = _as_diff(lora_diff)
    values = [as_coefficient(value, what) for value in coefficients]
    bad = diff.first_non_finite()
    if bad is not None:
        raise PersonaLoRAError(f"the persona diff has non-finite values (NaN or inf) in {bad}; re-create it")
    if isinstance(weights, SafetensorsCheckpoint):
        shapes, where = {name: weights.shape(name) for name in diff if name in weights}, f"the model {weights.folder}"
        candidates = lambda name: [name]  # noqa: E731 - a checkpoint holds the model's own names
        weight_norm = weight_norm or weights.norm
        dtype = dtype or torch.float32
    else:
        params = dict(weights.named_parameters())
        shapes, where = {name: tuple(p.shape) for name, p in params.items()}, "this model"
        candidates = lambda name: [name, f"base_model.model.{name}", name.replace(".weight", ".base_layer.weight"),  # noqa: E731
                                   f"base_model.model.{name}".replace(".weight", ".base_layer.weight")]
        weight_norm = weight_norm or (lambda name: float(params[name].detach().float().norm()))
    made_for = f" (the diff was made for {diff.metadata['base_model']})" if diff.metadata.get("base_model") else ""
    if diff.metadata.get("source_path"):
        where = f"{where} (diff {diff.metadata['source_path']})"
    resolved = {}
    for name in diff:
        match = next((c for c in candidates(name) if c in shapes), None)
        if match is None:
            raise PersonaLoRAError(f"the persona diff does not fit {where}: module {name} is missing{made_for}")
        if shapes[match] != diff.shape(name):
            raise PersonaLoRAError(f"the persona diff does not fit {where}: {name} is {diff.shape(name)} in the diff "
                                   f"but {shapes[match]} in the model{made_for}")
        resolved[name] = match
    if dtype is None:  # the weights' own dtype: the largest update it can hold
        dtype = params[next(iter(resolved.values()))].dtype
    norms: dict[str, float] = {}
    for value in values:
        check_coefficient_size(diff, value, lambda name: norms.setdefault(name, weight_norm(resolved[name])), dtype, what)
    return resolved


class _MergeState:
    """What every LoRAMerger of one model shares: the original weight W₀ of each parameter any of
    them touched, and each merger's live terms. A touched parameter is always W₀ + Σ (every live
    term of every merger), rounded once, so mergers may restore in any order and a parameter is
    bit-exactly W₀ again when no term touches it."""

    def __init__(self):
        self.backups: dict[str, torch.Tensor] = {}
        self.terms: dict[int, list[tuple[float, "PersonaLoRADiff", dict[str, str]]]] = {}


_MERGE_STATES: "weakref.WeakKeyDictionary[torch.nn.Module, _MergeState]" = weakref.WeakKeyDictionary()
_MERGER_IDS = itertools.count()


class LoRAMerger:
    """Merge persona diffs into a model's weights in place: W ← W₀ + Σᵢ cᵢ·ΔWᵢ.

    Each touched weight is recomputed from its backup in float32 and rounded once, so several
    merges compose without accumulating bf16 rounding, and restore_original_weights() copies the
    backups back bit-exactly. Backups are made lazily, only for the parameters a merge touches
    (on `backup_device`, e.g. "cpu", to spare accelerator memory). Several mergers of one model
    share their backups, so they can be restored in any order.
    """

    def __init__(self, model: torch.nn.Module, backup_device: str | torch.device | None = None):
        self.model = model
        self.backup_device = backup_device
        self._params = dict(model.named_parameters())
        self._state = _MERGE_STATES.setdefault(model, _MergeState())
        self._id = next(_MERGER_IDS)
        self.history: list[tuple[str, float]] = []
        self.workspace_elements = 1 << 18
        # In bf16/fp16 weights: ⟨achieved update, intended update⟩ / ‖intended‖² of the last merge.
        self.fidelity: float | None = None
        self._fidelity = [0.0, 0.0]

    @property
    def _terms(self) -> list[tuple[float, "PersonaLoRADiff", dict[str, str]]]:
        return self._state.terms.setdefault(self._id, [])

    def _original(self, param_name: str) -> torch.Tensor:
        return self._state.backups.get(param_name, self._params[param_name])

    def check(self, lora_diff, coefficient: float = 1.0, what: str = "coefficient") -> dict[str, str]:
        """Refuse a diff that does not fit this model, has non-finite values, or a coefficient that
        is not a finite number or is too large for the weights (check_diff_fits, measured on the
        unmerged weights). `what` names the coefficient in messages (a script passes its flag).
        Returns {diff module: this model's parameter name}. Touches nothing."""
        return check_diff_fits(lora_diff, self.model, [coefficient], what,
                               weight_norm=lambda name: float(self._original(name).detach().float().norm()))

    def _recompute(self, param_name: str) -> None:
        """param ← W₀ + Σ every live term touching it (all mergers of the model), rounded once;
        exactly W₀ (and the backup freed) when none does."""
        param = self._params[param_name]
        backup = self._state.backups[param_name]
        terms = [(c, diff, name) for merger_terms in self._state.terms.values() for c, diff, names in merger_terms
                 for name, target in names.items() if target == param_name]
        if not terms:
            param.copy_(backup)
            del self._state.backups[param_name]
            return
        up = torch.cat([c * diff.factors[name][0].to(device=param.device, dtype=torch.float32) for c, diff, name in terms], dim=1)
        down = torch.cat([diff.factors[name][1].to(device=param.device, dtype=torch.float32) for _, diff, name in terms], dim=0)
        # Row blocks keep the float32 workspace at ~1 MB whatever the module's size, so the extra
        # memory of a merge is its backups and nothing more.
        rows = max(1, self.workspace_elements // param.shape[1])
        low_precision = param.dtype in (torch.bfloat16, torch.float16)
        for start in range(0, param.shape[0], rows):
            intended = up[start:start + rows] @ down
            block = intended + backup[start:start + rows].to(param.device)
            param[start:start + rows].copy_(block)
            if low_precision:  # how much of the update survives rounding to the weights' dtype
                achieved = param[start:start + rows].float() - backup[start:start + rows].to(param.device).float()
                self._fidelity[0] += float((achieved * intended).sum())
                self._fidelity[1] += float((intended * intended).sum())

    def merge_lora_diff(self, lora_diff, coefficient: float = 1.0) -> "LoRAMerger":
        """Add coefficient·ΔW to the model's weights. Validates everything before touching any."""
        diff = _as_diff(lora_diff)
        resolved = self.check(diff, coefficient)
        coefficient = float(coefficient)  # a finite real number or a one-element tensor: check() made sure
        # Terms are kept by reference (no scaled copies of the factors): the only memory a merge
        # adds is the backups of the weights it touches.
        self._terms.append((coefficient, diff, resolved))
        self._fidelity = [0.0, 0.0]
        with torch.no_grad():
            for param_name in resolved.values():
                if param_name not in self._state.backups:
                    param = self._params[param_name]
                    self._state.backups[param_name] = param.detach().to(self.backup_device or param.device, copy=True)
                self._recompute(param_name)
        if self._fidelity[1] > 0:
            self.fidelity = self._fidelity[0] / self._fidelity[1]
            if self.fidelity < FIDELITY_WARNING and not _FIDELITY_WARNED:
                _FIDELITY_WARNED.append(True)
                print(f"warning: the weights' low-precision dtype keeps {self.fidelity:.0%} of the merged update along it "
                      f"(coefficient {coefficient:g}): small updates round away; load the model in float32 "
                      "(--dtype float32) for coefficients that mean what they say", file=sys.stderr)
        self.history.append((diff.metadata.get("trait") or diff.metadata.get("source_path") or "diff", coefficient))
        return self

    def restore_original_weights(self) -> None:
        """Remove this merger's terms. Weights no other merger touches are bit-exactly W₀ again."""
        touched = {target for _, _, names in self._terms for target in names.values()}
        self._state.terms.pop(self._id, None)
        with torch.no_grad():
            for param_name in touched:
                self._recompute(param_name)
        self.history.clear()

    @property
    def merged_diff(self) -> PersonaLoRADiff | None:
        """Σᵢ cᵢ·ΔWᵢ this merger has merged (None when nothing is)."""
        total = None
        for coefficient, diff, _ in self._terms:
            total = coefficient * diff if total is None else total + coefficient * diff
        return total

    def touched_parameters(self) -> set[str]:
        """The parameters that are not W₀ now, whichever merger of the model merged into them."""
        return set(self._state.backups)

    def backup_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._state.backups.values())


class CheckpointSwap(contextlib.AbstractContextManager):
    """Evaluate a full finetuned checkpoint on the loaded base model: on entry, every tensor of the
    checkpoint that differs from the model's replaces it (the originals backed up); on exit, the
    originals are copied back bit-exactly. Refuses a checkpoint of another architecture."""

    def __init__(self, model: torch.nn.Module, checkpoint: "SafetensorsCheckpoint"):
        self.model, self.checkpoint = model, checkpoint
        self._params = dict(model.named_parameters())
        self._backups: dict[str, torch.Tensor] = {}

    def check(self) -> list[str]:
        shared = [name for name in self.checkpoint.weight_map if name in self._params]
        if not shared:
            raise PersonaLoRAError(f"{self.checkpoint.folder} shares no tensor with the model: a checkpoint of another model?")
        for name in shared:
            if self.checkpoint.shape(name) != tuple(self._params[name].shape):
                raise PersonaLoRAError(f"{self.checkpoint.folder} is not a finetune of this model: {name} is "
                                       f"{self.checkpoint.shape(name)} there but {tuple(self._params[name].shape)} here")
        if LoRAMerger(self.model).touched_parameters():
            raise PersonaLoRAError("swap a finetuned checkpoint in before merging persona diffs, not after")
        return shared

    def __enter__(self) -> "CheckpointSwap":
        with torch.no_grad():
            for name in self.check():
                param = self._params[name]
                value = self.checkpoint.tensor(name).to(device=param.device, dtype=param.dtype)
                if not torch.equal(value, param):
                    self._backups[name] = param.detach().to("cpu", copy=True)
                    param.copy_(value)
        return self

    def __exit__(self, *exc_info) -> None:
        with torch.no_grad():
            for name, backup in self._backups.items():
                self._params[name].copy_(backup)
        self._backups.clear()


class LoRASteerer(contextlib.AbstractContextManager):
    """`with LoRASteerer(model, diff_or_path, coefficient): ...` merges on entry and restores on
    exit, also when the body raises. `LoRASteerer.compose(model, [(diff, c), ...])` merges several."""

    def __init__(self, model: torch.nn.Module, lora_diff_path, coefficient: float = 1.0, backup_device=None):
        self.merger = LoRAMerger(model, backup_device=backup_device)
        self.terms = [(lora_diff_path, coefficient)]

    @classmethod
    def compose(cls, model: torch.nn.Module, terms, backup_device=None) -> "LoRASteerer":
        steerer = cls(model, None, backup_device=backup_device)
        steerer.terms = list(terms)
        return steerer

    def __enter__(self) -> LoRAMerger:
        try:
            for diff, coefficient in self.terms:
                self.merger.merge_lora_diff(diff, coefficient)
        except BaseException:
            self.merger.restore_original_weights()
            raise
        return self.merger

    def __exit__(self, *exc_info) -> None:
        self.merger.restore_original_weights()


# ---------------------------------------------------------------------------------------------
# Projections of weight changes onto a persona direction
# ---------------------------------------------------------------------------------------------


def peft_model_update(model: torch.nn.Module, adapter_name: str | None = None) -> PersonaLoRADiff:
    """The exact low-rank update s·B·A of every LoRA layer of a loaded PEFT model."""
    factors = {}
    for module_name, module in model.named_modules():
        if not hasattr(module, "lora_A") or not hasattr(module, "scaling"):
            continue
        names = [adapter_name] if adapter_name else list(module.lora_A.keys())
        for name in names:
            if name not in module.lora_A:
                continue
            down = module.lora_A[name].weight.detach().float()
            up = module.lora_B[name].weight.detach().float() * module.scaling[name]
            if getattr(module, "fan_in_fan_out", False):  # Conv1D-style weights are stored transposed: ΔWᵀ = Aᵀ·Bᵀ
                up, down = down.T.contiguous(), up.T.contiguous()
            param_name = f"{module_name}.weight".removeprefix("base_model.model.")
            if param_name in factors:  # several adapters: their updates add
                prev_up, prev_down = factors[param_name]
                up, down = torch.cat([prev_up, up], 1), torch.cat([prev_down, down], 0)
            factors[param_name] = (up, down)
    return PersonaLoRADiff(factors, {"provenance": "PEFT model update"})


class WeightProjector:
    """Projections of a weight change D onto a persona direction ΔW, computed from the factors.

    For one module: projection = ⟨D, ΔW⟩_F / ‖ΔW‖_F (the length of D along ΔŴ, in weight units)
    and cosine = ⟨D, ΔW⟩_F / (‖D‖_F·‖ΔW‖_F). Summed over a set of modules (a layer, or the whole
    model) the inner products and squared norms add before dividing.
    """

    @staticmethod
    def module_projection(delta, lora_diff: PersonaLoRADiff, name: str) -> dict:
        """`delta` is a dense tensor (out × in) or a low-rank (B, A) pair."""
        if isinstance(delta, torch.Tensor):
            if tuple(delta.shape) != lora_diff.shape(name):
                raise PersonaLoRAError(f"weight change for {name} is {tuple(delta.shape)} but the diff is {lora_diff.shape(name)}")
            inner = dense_lowrank_inner(delta, *lora_diff.factors[name])
            delta_sq = float(delta.to(torch.float64).pow(2).sum())
        else:
            up, down = delta
            inner = lowrank_inner(up, down, *lora_diff.factors[name])
            delta_sq = lowrank_inner(up, down, up, down)
        return _projection_stats(inner, delta_sq, lora_diff.module_sq_norm(name))

    @staticmethod
    def project(delta_source, lora_diff) -> dict:
        """Project a whole weight change onto ΔW.

        `delta_source` is a PersonaLoRADiff (any low-rank update, e.g. load_adapter_update(dir)),
        or a mapping / iterable of (param_name, dense D). Projection and cosine are over the
        diff's modules only, whatever the source; the change in every other module the source
        holds is reported apart as "outside_diff_change_norm". Returns the total, per layer and
        per module: {"projection", "cosine", "inner", "delta_norm", "diff_norm"}.
        """
        diff = _as_diff(lora_diff)
        if isinstance(delta_source, PersonaLoRADiff):
            items = ((name, delta_source.factors[name]) for name in delta_source)
        else:
            items = delta_source.items() if isinstance(delta_source, Mapping) else delta_source
        modules, outside_sq = {}, 0.0
        for name, delta in items:
            if name in diff:
                modules[name] = WeightProjector.module_projection(delta, diff, name)
            elif isinstance(delta, torch.Tensor):
                outside_sq += float(delta.to(torch.float64).pow(2).sum())
            else:
                outside_sq += lowrank_inner(*delta, *delta)
        if not modules:
            raise PersonaLoRAError("the weight change and the persona diff share no module (different models or target modules?)")
        return {**_aggregate(modules), "outside_diff_change_norm": math.sqrt(max(outside_sq, 0.0))}

    @staticmethod
    def project_finetune(original, finetune, lora_diff) -> dict:
        """A finetune's folder (PEFT adapter or full checkpoint) projected onto ΔW; see project_finetune."""
        return project_finetune(original, finetune, lora_diff)

    @staticmethod
    def compute_layer_projections(model: torch.nn.Module, lora_diff_path, num_layers: int | None = None,
                                  reference_model: torch.nn.Module | None = None) -> dict[int, dict]:
        """Per-layer projection of a model's weight change onto each layer's part of ΔW.

        The weight change D is, for a PEFT model (a LoRA finetune loaded on its base), the
        adapter's own exact update, so no base weights are needed; otherwise D = W_model − W_ref
        with `reference_model` the model before finetuning. Layer ℓ's number is
        ⟨D_ℓ, ΔW_ℓ⟩_F / ‖ΔW_ℓ‖_F over the modules of layer ℓ (and its cosine). Returns
        {ℓ: {"projection", "cosine", "inner", "delta_norm", "diff_norm"}} for ℓ < num_layers.
        """
        diff = _as_diff(lora_diff_path)
        num_layers = num_layers or getattr(getattr(model, "config", None), "num_hidden_layers", None)
        if num_layers is None:
            raise PersonaLoRAError("num_layers is not given and the model has no config.num_hidden_layers")
        too_deep = [i for i in diff.layers() if i >= num_layers]
        if too_deep:
            raise PersonaLoRAError(f"the diff touches layer {too_deep[0]} but num_layers={num_layers}; pass the model's layer count")
        if reference_model is not None:
            reference = dict(reference_model.named_parameters())
            params = dict(model.named_parameters())

            def dense_changes():
                for name in diff:
                    if name not in params or name not in reference:
                        raise PersonaLoRAError(f"module {name} of the diff is missing from the model or the reference model")
                    yield name, params[name].detach() - reference[name].detach().to(params[name].device)

            result = WeightProjector.project(dense_changes(), diff)
        else:
            update = peft_model_update(model)
            if not len(update):
                raise PersonaLoRAError(
                    "compute_layer_projections needs a weight change: pass a PEFT model (base + finetune adapter) "
                    "or reference_model= (the model before finetuning)"
                )
            result = WeightProjector.project(update, diff)
        empty = _projection_stats(0.0, 0.0, 0.0)
        return {index: result["layers"].get(index, empty) for index in range(num_layers)}


# ---------------------------------------------------------------------------------------------
# Projecting a finetune (a PEFT adapter or a full checkpoint) onto a persona diff
# ---------------------------------------------------------------------------------------------


ARCHITECTURE_KEYS = ("architectures", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                     "num_key_value_heads", "vocab_size")
SHARED_ROW_SPACE_WARNING = 5.0  # times what an independent start gives (≈ k/in of the lora_A energy in the diff's row space)


def check_same_architecture(original: SafetensorsCheckpoint, finetuned: SafetensorsCheckpoint) -> None:
    for key in ARCHITECTURE_KEYS:
        if key in original.config and key in finetuned.config and original.config[key] != finetuned.config[key]:
            raise PersonaLoRAError(f"{finetuned.folder} is not a finetune of {original.folder}: config '{key}' is "
                                   f"{finetuned.config[key]} vs {original.config[key]}")


def project_checkpoint(original: SafetensorsCheckpoint, folder: Path, diff: PersonaLoRADiff) -> dict:
    """Stream W_ft − W_orig one tensor at a time: memory stays at a couple of tensors. Every tensor
    is read, those outside the diff for outside_diff_change_norm."""
    finetuned = SafetensorsCheckpoint(folder)
    check_same_architecture(original, finetuned)
    missing = [name for name in diff.module_names if name not in finetuned]
    if missing:
        raise PersonaLoRAError(f"{folder} has no tensor {missing[0]}: a checkpoint of another architecture?")

    result = WeightProjector.project(checkpoint_changes(original, finetuned, list(finetuned.weight_map), f"projecting {folder.name}"), diff)
    return {**result, "kind": "checkpoint", "bytes": finetuned.nbytes()}


def checkpoint_changes(original: SafetensorsCheckpoint, finetuned: SafetensorsCheckpoint, names: list[str], desc: str) -> Iterator:
    """(name, W_ft − W_orig in float32) for each of `names` the original also holds, read one tensor
    at a time (a tqdm bar named `desc`); a tensor of another shape is refused in one line."""
    from tqdm.auto import tqdm

    for name in tqdm(names, desc=desc, leave=False):
        if name in original:
            yield name, checkpoint_change(original, finetuned, name)


def checkpoint_change(original: SafetensorsCheckpoint, finetuned: SafetensorsCheckpoint, name: str) -> torch.Tensor:
    """W_ft − W_orig of one tensor in float32; a tensor of another shape is refused in one line."""
    if finetuned.shape(name) != original.shape(name):
        raise PersonaLoRAError(f"{finetuned.folder}: {name} is {finetuned.shape(name)} but {original.shape(name)} in the original model")
    return finetuned.tensor(name).to(torch.float32) - original.tensor(name).to(torch.float32)


def shared_row_space(update: PersonaLoRADiff, diff: PersonaLoRADiff) -> tuple[float, float]:
    """The share of the adapter's A rows' energy inside the row space of the diff's A, over the
    modules both touch, and what independently drawn rows would give (rank k over the input size
    in): near 1 for an adapter that started from the persona adapters' lora_A."""
    inside = total = chance = 0.0
    for name in update:
        if name not in diff:
            continue
        rows = update.factors[name][1].double()
        basis, _ = torch.linalg.qr(diff.factors[name][1].double().T)  # in × k orthonormal
        energy = float(rows.pow(2).sum())
        inside += float((rows @ basis).pow(2).sum())
        total += energy
        chance += energy * basis.shape[1] / basis.shape[0]
    return (inside / total, chance / total) if total > 0 else (0.0, 0.0)


def shared_row_space_alarm(chance: float) -> float:
    """The share above which an adapter is taken to share the persona adapters' start: five times
    chance, or halfway from chance to 1 where chance is already large (small models)."""
    return min(SHARED_ROW_SPACE_WARNING * chance, chance + 0.5 * (1 - chance))


def project_adapter(original: SafetensorsCheckpoint, folder: Path, diff: PersonaLoRADiff) -> dict:
    """A LoRA finetune projects from its own factors: no base weights are read (only shapes)."""
    update = load_adapter_update(folder)
    for name in update:
        if name not in original or original.shape(name) != update.shape(name):
            raise PersonaLoRAError(f"the adapter {folder} is for another base model than {original.folder}: module {name} "
                                   f"is {update.shape(name)} in the adapter"
                                   + (f" but {original.shape(name)} in the model" if name in original else " and missing in the model"))
    result = WeightProjector.project(update, diff)
    share, chance = shared_row_space(update, diff)
    return {**result, "kind": "adapter", "bytes": sum(p.stat().st_size for p in folder.glob("adapter_model.*")),
            "shared_row_space": share, "shared_row_space_chance": chance}


def project_finetune(original, finetune, lora_diff) -> dict:
    """Project a finetune of `original` (a model folder or a SafetensorsCheckpoint) onto a persona
    diff: a PEFT adapter folder from its own factors, a full checkpoint streamed tensor by tensor.
    Warns when an adapter shares the persona adapters' initialisation (its projection is then
    inflated by construction). Returns projection, cosine, change norms, per layer and module."""
    if not isinstance(original, SafetensorsCheckpoint):
        from model_loading import resolve_model_folder

        original = SafetensorsCheckpoint(resolve_model_folder(original))
    folder, diff = Path(finetune), _as_diff(lora_diff)
    if not folder.is_dir():
        raise PersonaLoRAError(f"finetuned model not found: {folder}")
    result = project_adapter(original, folder, diff) if (folder / "adapter_config.json").is_file() \
        else project_checkpoint(original, folder, diff)
    modules = result.pop("modules")
    if "shared_row_space" in result and result["shared_row_space"] > shared_row_space_alarm(result["shared_row_space_chance"]):
        print(f"WARNING: {folder} shares the persona adapters' initialisation ({result['shared_row_space']:.1%} of its lora_A lies "
              f"in the diff's row space; an independent start gives about {result['shared_row_space_chance']:.1%}): its projection "
              "is inflated by construction, retrain it with another seed", flush=True)
    return {"path": str(folder), "name": folder.name, "projection": result["projection"], "cosine": result["cosine"],
            "change_norm": result["delta_norm"], "outside_diff_change_norm": result["outside_diff_change_norm"],
            "diff_norm": result["diff_norm"], "kind": result["kind"], "bytes": result["bytes"],
            **({key: result[key] for key in ("shared_row_space", "shared_row_space_chance") if key in result}),
            "modules_projected": len(modules), "layers": result["layers"], "modules": modules}


# ---------------------------------------------------------------------------------------------
# Random low-rank nulls matched to a diff, and a finetune's projection against them
# ---------------------------------------------------------------------------------------------

PROJECTION_NULL_STREAM = "projection-null"


def _null_generator(seed: int, module: str, like: str, factor: str, stream: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{stream}:{seed}:{like}:{module}:{factor}".encode()))


def null_down(shape: tuple[int, int], rank: int, draws: int, seed: int, module: str, like: str, stream: str) -> torch.Tensor:
    """The down factors A [draws, rank, in] of `draws` random rank-`rank` updates of a [out, in]
    weight (Gaussian), from their own generator, seeded by (stream, seed, like, module): the same
    draws whenever the same diff (`like`) is matched, whatever else is computed beside them."""
    return torch.randn(draws, rank, shape[1], generator=_null_generator(seed, module, like, "A", stream))


def null_up(shape: tuple[int, int], rank: int, draws: int, seed: int, module: str, like: str, stream: str) -> torch.Tensor:
    """Their up factors B [draws, out, rank] (Gaussian, own generator)."""
    return torch.randn(draws, shape[0], rank, generator=_null_generator(seed, module, like, "B", stream))


def null_scales(up: torch.Tensor, down: torch.Tensor, norm: float) -> torch.Tensor:
    """Per draw, the factor that brings ‖B·A‖_F to `norm` (the matched diff's module norm)."""
    squares = ((up.transpose(1, 2) @ up) * (down @ down.transpose(1, 2))).sum((1, 2)).double()
    return norm / squares.clamp_min(1e-300).sqrt()


def against_null(observed: float, null: list[float]) -> dict:
    """An observed value against its null draws: their mean, spread and maximum, the z-score, the
    one-sided share of draws reaching it (the observed counted: (1 + k)/(1 + N), never 0) and the
    two-sided share reaching its size."""
    values = torch.tensor(null, dtype=torch.float64)
    mean, sd = float(values.mean()), float(values.std())
    reaching = int((values >= observed).sum())
    as_large = int((values.abs() >= abs(observed)).sum())
    return {"draws": len(null), "null_mean": mean, "null_sd": sd, "null_max": float(values.max()),
            "null_max_abs": float(values.abs().max()),
            "z": (observed - mean) / sd if sd > 0 else float("nan"), "p": (1 + reaching) / (1 + len(null)),
            "p_two_sided": (1 + as_large) / (1 + len(null))}


def _draws_inner(delta, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """⟨D, B_d·A_d⟩_F for every draw d [draws] without forming any B_d·A_d: for a dense D, one
    matmul (B_dᵀ·D for all draws at once) then a product with A_d; for a low-rank D = B·A,
    sum((Bᵀ·B_d) ⊙ (A·A_dᵀ))."""
    draws, out_features, rank = up.shape
    if isinstance(delta, torch.Tensor):
        projected = up.transpose(1, 2).reshape(draws * rank, out_features) @ delta.to(up.dtype)  # [draws·rank, in]
        return (projected.view(draws, rank, -1).double() * down.double()).sum((1, 2))
    b, a = (t.to(up.dtype) for t in delta)
    return ((b.T @ up).double() * (a @ down.transpose(1, 2)).double()).sum((1, 2))


def _finetune_source(original: SafetensorsCheckpoint, folder: Path):
    """(kind, change_of): change_of(name) is the finetune's change of one module, an adapter's own
    factors (B, A) or a checkpoint's W_ft − W_orig read when asked, None where it has none."""
    if not folder.is_dir():
        raise PersonaLoRAError(f"finetuned model not found: {folder}")
    if (folder / "adapter_config.json").is_file():
        update = load_adapter_update(folder)
        return "adapter", lambda name: update.factors.get(name)
    finetuned = SafetensorsCheckpoint(folder)
    check_same_architecture(original, finetuned)
    return "checkpoint", lambda name: checkpoint_change(original, finetuned, name) if name in finetuned and name in original else None


def project_finetune_null(original, finetune, diffs: Mapping[str, PersonaLoRADiff], null_diffs: Mapping[str, PersonaLoRADiff] | None = None,
                          draws: int = 100, seed: int = 0, stream: str = PROJECTION_NULL_STREAM) -> dict:
    """A finetune's projection onto each persona diff of `diffs` ({label: diff}) against two nulls:
    `draws` random low-rank directions with that diff's per-module ranks and Frobenius norms
    (Gaussian factors from null_down / null_up, matched by null_scales; the same draws for every
    finetune, keyed by the label), and the other traits' diffs of `null_diffs`.

    A draw R has ‖R‖_F = ‖ΔW‖_F (every module matched), so its projection ⟨D, R⟩_F / ‖R‖_F is on
    the persona projection's own scale. Returns {label: {"projection", "null": against_null(...),
    "null_draws": [...], "null_diffs": {name: projection}, "null_diffs_reaching": k}}, k counting the
    other traits' diffs at least as large in absolute value (two-sided, as the draws' p)."""
    return project_finetunes_null(original, [finetune], diffs, null_diffs, draws, seed, stream)[0]


def project_finetunes_null(original, finetunes, diffs: Mapping[str, PersonaLoRADiff], null_diffs: Mapping[str, PersonaLoRADiff] | None = None,
                           draws: int = 100, seed: int = 0, stream: str = PROJECTION_NULL_STREAM) -> list[dict]:
    """project_finetune_null for several finetunes at once, one report each: every module's draws
    are generated once and projected on by every finetune (generating them is most of the cost, and
    they are the same draws for every finetune). Each finetune is read once, one module at a time:
    an adapter from its factors (no B·A formed), a checkpoint one tensor at a time."""
    from tqdm.auto import tqdm

    if not isinstance(original, SafetensorsCheckpoint):
        from model_loading import resolve_model_folder

        original = SafetensorsCheckpoint(resolve_model_folder(original))
    null_diffs = dict(null_diffs or {})
    sources = [_finetune_source(original, Path(finetune)) for finetune in finetunes]
    modules = list(dict.fromkeys(m for d in [*diffs.values(), *null_diffs.values()] for m in d.module_names))
    inner = [{label: 0.0 for label in diffs} for _ in sources]
    drawn = [{label: torch.zeros(draws, dtype=torch.float64) for label in diffs} for _ in sources]
    null_inner = [{name: 0.0 for name in null_diffs} for _ in sources]

    def inner_with(delta, factors) -> float:
        return dense_lowrank_inner(delta, *factors) if isinstance(delta, torch.Tensor) else lowrank_inner(*delta, *factors)

    for name in tqdm(modules, desc=f"null projections of {len(sources)} finetune(s)", leave=False):
        module_draws = {}
        for label, diff in diffs.items():
            if name in diff:
                shape, rank = diff.shape(name), diff.rank(name)
                up, down = null_up(shape, rank, draws, seed, name, label, stream), null_down(shape, rank, draws, seed, name, label, stream)
                module_draws[label] = (up, down, null_scales(up, down, diff.module_norm(name)))
        for index, (_, change_of) in enumerate(sources):
            delta = change_of(name)
            if delta is None:
                continue
            for label, (up, down, scales) in module_draws.items():
                drawn[index][label] += scales * _draws_inner(delta, up, down)
                inner[index][label] += inner_with(delta, diffs[label].factors[name])
            for other, diff in null_diffs.items():
                if name in diff:
                    null_inner[index][other] += inner_with(delta, diff.factors[name])
    reports = []
    for index, (kind, _) in enumerate(sources):
        others = {other: null_inner[index][other] / diff.norm() for other, diff in null_diffs.items()}
        report = {}
        for label, diff in diffs.items():
            projection, null = inner[index][label] / diff.norm(), (drawn[index][label] / diff.norm()).tolist()
            report[label] = {"projection": projection, "null": against_null(projection, null), "null_draws": null,
                             "null_diffs": others, "null_diffs_reaching": sum(abs(v) >= abs(projection) for v in others.values()),
                             "kind": kind}
        reports.append(report)
    return reports


def _projection_stats(inner: float, delta_sq: float, diff_sq: float) -> dict:
    diff_norm, delta_norm = math.sqrt(max(diff_sq, 0.0)), math.sqrt(max(delta_sq, 0.0))
    return {
        "projection": inner / diff_norm if diff_norm > 0 else 0.0,
        "cosine": inner / (diff_norm * delta_norm) if diff_norm > 0 and delta_norm > 0 else 0.0,
        "inner": inner,
        "delta_norm": delta_norm,
        "diff_norm": diff_norm,
    }


def _aggregate(modules: dict[str, dict]) -> dict:
    def combine(stats: Iterable[dict]) -> dict:
        stats = list(stats)
        return _projection_stats(
            sum(s["inner"] for s in stats),
            sum(s["delta_norm"] ** 2 for s in stats),
            sum(s["diff_norm"] ** 2 for s in stats),
        )

    by_layer: dict[int, list[dict]] = {}
    for name, stats in modules.items():
        index = layer_index(name)
        if index is not None:
            by_layer.setdefault(index, []).append(stats)
    total = combine(modules.values())
    return {**total, "layers": {i: combine(s) for i, s in sorted(by_layer.items())}, "modules": modules}
