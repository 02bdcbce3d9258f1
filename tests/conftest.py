"""Shared fixtures: a tiny random Llama built in-process, and PEFT adapters trained on nothing but
random init, so every test runs in seconds without a download."""

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    settings = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                    pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    settings.update(overrides)
    return LlamaConfig(**settings)


def make_tiny_llama(seed=0, dtype=torch.float32, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides)).to(dtype)
    model.eval()
    return model


def make_adapter(model, out_dir, seed, r=4, alpha=8, use_rslora=False, target_modules=TARGET_MODULES, **lora_kwargs):
    """Save a PEFT adapter with random A *and* B (init_lora_weights=False) for `model`."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, use_rslora=use_rslora, target_modules=list(target_modules),
                        init_lora_weights=False, lora_dropout=0.0, **lora_kwargs)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # a persona-sized update: small next to the weights, as trained adapters are
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(0.05)
    peft_model.save_pretrained(str(out_dir))
    base = peft_model.unload()  # strip the LoRA layers again, leaving `model` untouched
    return Path(out_dir), base


@pytest.fixture
def tiny_model():
    return make_tiny_llama()


@pytest.fixture
def adapter_pair(tmp_path):
    """(model, pos_dir, neg_dir): two adapters of the same shape but different seeds and scales."""
    model = make_tiny_llama()
    pos_dir, model = make_adapter(model, tmp_path / "pos", seed=1, r=4, alpha=8, use_rslora=True)
    neg_dir, model = make_adapter(model, tmp_path / "neg", seed=2, r=4, alpha=8, use_rslora=True)
    return model, pos_dir, neg_dir


def embedded_tokenizer():
    """The embedded model's tokenizer and chat template without converting its weights: from the
    converted folder when a run has already cached it, else read from the packaged GGUF alone
    (seconds; the 135M model's conversion would take minutes). Both are the same tokenizer, the
    one the conversion saves, with load_tokenizer's pad token and left padding."""
    from transformers import AutoTokenizer

    from io_utils import cache_dir
    from model_loading import EMBEDDED_GGUF_PACKAGE, EMBEDDED_MODEL_NAME, _package_dir, load_tokenizer

    if (cache_dir() / EMBEDDED_MODEL_NAME / "config.json").is_file():
        return load_tokenizer(None)
    module, install, gguf_file = EMBEDDED_GGUF_PACKAGE
    tokenizer = AutoTokenizer.from_pretrained(_package_dir(module, install), gguf_file=gguf_file)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama saved as a model folder with the embedded model's real tokenizer and chat
    template, so the scripts run end to end in seconds."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = embedded_tokenizer()
    model = make_tiny_llama(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_script(script, *args):
    """Run a stage script's main() in-process with these flags; returns its exit status."""
    import importlib

    module = importlib.import_module(script)
    saved = sys.argv
    sys.argv = [f"{script}.py", *map(str, args)]
    try:
        module.main()
        return 0
    except SystemExit as exit_:
        return exit_.code
    finally:
        sys.argv = saved


def run_cli(script, *args, cwd=None):
    """Run a stage script in a subprocess, as a user would: (returncode, stdout, stderr)."""
    import subprocess

    result = subprocess.run([sys.executable, str(ROOT / f"{script}.py"), *map(str, args)], capture_output=True, text=True,
                            cwd=cwd or ROOT, timeout=600)
    return result.returncode, result.stdout, result.stderr


def run_main(script, *args, cwd=None):
    """Run a stage script in this process exactly as `python script.py` runs it (io_utils.run_cli
    around main(): a refused input is one line on stderr and exit status 2), from the repository
    root or `cwd`: (returncode, stdout, stderr), as run_cli returns them. For refusals, which come
    before any model loads, and small runs, this tests what run_cli does without a fresh process
    importing torch for every case."""
    import contextlib
    import importlib
    import io

    from io_utils import run_cli as entry_point

    module = importlib.import_module(script.replace("/", "."))
    stdout, stderr = io.StringIO(), io.StringIO()
    saved_argv, saved_cwd = sys.argv, os.getcwd()
    sys.argv = [str(ROOT / f"{script}.py"), *map(str, args)]
    os.chdir(cwd or ROOT)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            entry_point(module.main)
        code = 0
    except SystemExit as exit_:
        code = 0 if exit_.code is None else exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
    return code, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="session")
def judge_data(tmp_path_factory):
    """An extraction data folder for the offline judge: real responses of the embedded model under
    the evil / anti-evil prompts (tests/data), copied so the judge's fitted classifier lands in tmp."""
    folder = tmp_path_factory.mktemp("judge_data")
    for side in ("pos", "neg"):
        (folder / f"{side}.jsonl").write_text((ROOT / "tests" / "data" / f"evil_smollm2_{side}.jsonl").read_text())
    return folder


@pytest.fixture(scope="session")
def tiny_persona(tiny_model_dir, tmp_path_factory):
    """(diff_path, vector_path) for the tiny model: a diff of two random adapters and a random
    vector of shape [L+1, hidden]."""
    from transformers import AutoModelForCausalLM

    import lora_utils as lu

    root = tmp_path_factory.mktemp("tiny_persona")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    make_adapter(model, root / "pos", seed=1, r=2, alpha=4)
    make_adapter(model, root / "neg", seed=2, r=2, alpha=4)
    diff_path = lu.compute_persona_lora_diff(root / "pos", root / "neg", trait="evil").save(root / "evil_lora_diff.pt")
    vector_path = root / "evil_response_avg_diff.pt"
    torch.manual_seed(0)
    torch.save(torch.randn(model.config.num_hidden_layers + 1, model.config.hidden_size), vector_path)
    return diff_path, vector_path
