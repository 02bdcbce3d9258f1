"""Integration on the embedded SmolLM2-135M-Instruct: real weights, real tokenizer, real chat template."""

import pytest
import torch

import lora_utils as lu
from conftest import make_adapter
from io_utils import cache_dir
from model_loading import EMBEDDED_MODEL_NAME, load_model_and_tokenizer

pytestmark = pytest.mark.embedded


@pytest.fixture(scope="module")
def embedded():
    return load_model_and_tokenizer(None, dtype="float32")


def test_embedded_model_loads_offline_with_chat_template(embedded):
    model, tokenizer = embedded
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>assistant" in prompt
    assert (cache_dir() / EMBEDDED_MODEL_NAME / "config.json").is_file()


def test_config_before_conversion_equals_the_converted_one(embedded, tmp_path, monkeypatch):
    """Input checks read the embedded config from the GGUF while no converted folder exists (a fresh
    machine), so a refusal never waits for the conversion: it must be the config the conversion writes."""
    from model_loading import model_config

    converted = model_config(None).to_dict()
    monkeypatch.setenv("PERSONA_LORAS_CACHE", str(tmp_path / "empty"))
    fresh = model_config(None).to_dict()
    assert not (tmp_path / "empty").exists()  # nothing converted, nothing written
    differing = {k for k in set(converted) | set(fresh) if converted.get(k) != fresh.get(k)}
    assert differing <= {"_name_or_path", "dtype"}, {k: (converted.get(k), fresh.get(k)) for k in differing}
    assert fresh["architectures"] == ["LlamaForCausalLM"]


def test_merge_generate_restore_on_embedded_model(embedded, tmp_path):
    model, tokenizer = embedded
    base = [load_model_and_tokenizer(None, dtype="float32")[0]]  # a fresh copy for adapter creation
    pos_dir, _ = make_adapter(base[0], tmp_path / "pos", seed=1, r=4, alpha=8, target_modules=["o_proj", "down_proj"])
    neg_dir, _ = make_adapter(base[0], tmp_path / "neg", seed=2, r=4, alpha=8, target_modules=["o_proj", "down_proj"])
    diff = lu.compute_persona_lora_diff(pos_dir, neg_dir, trait="random")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    inputs = tokenizer.apply_chat_template([[{"role": "user", "content": "Name a colour."}]], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True, padding=True)
    with torch.no_grad():
        plain = model(**inputs).logits[0, -1].float()
        with lu.LoRASteerer(model, diff, coefficient=0.05, backup_device="cpu"):
            steered = model(**inputs).logits[0, -1].float()
    assert not torch.allclose(plain, steered, atol=1e-2)
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name
    # The reference: PEFT serving the diff exported at the same coefficient gives the same logits.
    from peft import PeftModel

    diff.to_peft_adapter(tmp_path / "export", coefficient=0.05)
    served = PeftModel.from_pretrained(load_model_and_tokenizer(None, dtype="float32")[0], str(tmp_path / "export"))
    with torch.no_grad():
        reference = served(**inputs).logits[0, -1].float()
    assert torch.allclose(steered, reference, atol=2e-3, rtol=1e-4)  # merged in place == served by PEFT
    assert (steered - plain).abs().max() > 100 * (steered - reference).abs().max()
