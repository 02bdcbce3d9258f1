"""export_persona.py: GGUF LoRA adapters and control vectors checked in llama.cpp itself, the PEFT
route, and the refusals (one line, exit status 2, nothing written, no model loaded)."""

import sys

import gguf
import numpy as np
import pytest
import torch

from conftest import run_script

import gguf_export
import io_utils
import lora_utils as lu


def export(*args):
    """export_persona.py in-process, as a user runs it: (exit status, stderr lines)."""
    import export_persona

    saved = sys.argv
    sys.argv = ["export_persona.py", *map(str, args)]
    try:
        io_utils.run_cli(export_persona.main)
        return 0
    except SystemExit as exit_:
        return exit_.code
    finally:
        sys.argv = saved


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if anything loads model weights (only configs may be read)."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


# --- what the files hold ---------------------------------------------------------------------


def test_gguf_lora_names_shapes_and_qk_rows(tiny_persona, tiny_model_dir, tmp_path):
    diff_path, _ = tiny_persona
    diff = lu.load_lora_diff(diff_path)
    assert export("--lora_diff_path", diff_path, "--format", "gguf", "--output", tmp_path / "evil.gguf", "--model", tiny_model_dir) == 0
    reader = gguf.GGUFReader(str(tmp_path / "evil.gguf"))
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora" and fields["general.architecture"] == "llama"
    assert "adapter.lora.alpha" not in fields  # llama.cpp then scales by the runtime scale alone
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    assert len(tensors) == 2 * len(diff)
    up, down = diff.factors["model.layers.1.self_attn.k_proj.weight"]
    # The tiny Llama: 4 heads of 8 dimensions, 2 of them key/value heads. Within a head, llama.cpp
    # interleaves the two rope halves: rows 0, 4, 1, 5, 2, 6, 3, 7 of transformers' order.
    order = [h * 8 + i for h in range(2) for pair in range(4) for i in (pair, pair + 4)]
    assert np.array_equal(tensors["blk.1.attn_k.weight.lora_b"], up[order].numpy())
    assert np.array_equal(tensors["blk.1.attn_k.weight.lora_a"], down.numpy())
    v_up, _ = diff.factors["model.layers.1.self_attn.v_proj.weight"]
    assert np.array_equal(tensors["blk.1.attn_v.weight.lora_b"], v_up.numpy())  # only q and k are reordered


def test_peft_export_through_the_same_command(tiny_persona, tmp_path):
    diff_path, _ = tiny_persona
    assert export("--lora_diff_path", diff_path, "--format", "peft", "--coef", -1.5, "--output", tmp_path / "peft") == 0
    exported, diff = lu.load_adapter_update(tmp_path / "peft"), lu.load_lora_diff(diff_path)
    name = diff.module_names[0]
    assert torch.allclose(exported.delta(name), -1.5 * diff.delta(name), atol=1e-6)


def test_control_vector_file(tiny_persona, tiny_model_dir, tmp_path):
    _, vector_path = tiny_persona
    assert export("--vector_path", vector_path, "--layer", 2, "--format", "gguf_control_vector",
                  "--output", tmp_path / "v.gguf", "--model", tiny_model_dir) == 0
    reader = gguf.GGUFReader(str(tmp_path / "v.gguf"))
    assert reader.fields["general.architecture"].contents() == "controlvector"
    assert [t.name for t in reader.tensors] == ["direction.1"]  # added to the output of block 1 = hidden_states[2]
    vector = torch.load(vector_path, weights_only=True)
    buffer = gguf_export.control_vector_buffer(tmp_path / "v.gguf", vector.shape[1], strength=2.0)
    assert np.allclose(buffer, 2.0 * vector[2].numpy())  # slot 0 is block 1's, as llama_set_adapter_cvec reads it


# --- refusals --------------------------------------------------------------------------------


def refused(capsys, folder, *args, message):
    before = leftovers(folder)
    code = export(*args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert leftovers(folder) == before  # nothing written, not even a temporary file
    return err


def test_a_diff_for_another_model_is_refused(tiny_persona, tmp_path, capsys, no_model_loads):
    diff_path, _ = tiny_persona  # made for a tiny Llama, exported for the embedded SmolLM2
    err = refused(capsys, tmp_path, "--lora_diff_path", diff_path, "--format", "gguf", "--output", tmp_path / "x.gguf",
                  message="does not fit SmolLM2-135M-Instruct")
    assert "model.layers.0." in err


def test_a_module_without_gguf_mapping_is_refused(tiny_model_dir, tmp_path, capsys, no_model_loads):
    gpt2_like = lu.PersonaLoRADiff({"transformer.h.0.attn.c_attn.weight": (torch.ones(96, 2), torch.ones(2, 32))})
    gpt2_like.save(tmp_path / "gpt2.pt", safetensors_twin=False)
    refused(capsys, tmp_path, "--lora_diff_path", tmp_path / "gpt2.pt", "--format", "gguf", "--output", tmp_path / "x.gguf",
            "--model", tiny_model_dir, message="cannot export module transformer.h.0.attn.c_attn.weight to GGUF")


def test_an_unmapped_architecture_is_refused(tiny_persona, tmp_path, capsys):
    from transformers import Qwen2Config

    folder = tmp_path / "qwen"
    Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                architectures=["Qwen2ForCausalLM"]).save_pretrained(folder)
    refused(capsys, tmp_path, "--lora_diff_path", tiny_persona[0], "--format", "gguf", "--output", tmp_path / "x.gguf",
            "--model", folder, message="Qwen2ForCausalLM has no GGUF mapping")


def test_a_vector_of_the_wrong_width_is_refused(tiny_persona, tmp_path, capsys, no_model_loads):
    refused(capsys, tmp_path, "--vector_path", tiny_persona[1], "--layer", 2, "--format", "gguf_control_vector",
            "--output", tmp_path / "v.gguf", message="needs [31, 576]")


def test_layer_one_is_refused_for_a_control_vector(tiny_persona, tiny_model_dir, tmp_path, capsys):
    refused(capsys, tmp_path, "--vector_path", tiny_persona[1], "--layer", 1, "--format", "gguf_control_vector",
            "--output", tmp_path / "v.gguf", "--model", tiny_model_dir, message="--layer 1 cannot be exported")


def test_an_unwritable_output_is_refused(tiny_persona, tmp_path, capsys, no_model_loads):
    (tmp_path / "a_file").write_text("")
    refused(capsys, tmp_path, "--lora_diff_path", tiny_persona[0], "--format", "gguf", "--output", tmp_path / "a_file" / "x.gguf",
            message="is a file, not a folder")


@pytest.mark.parametrize("flags, message", [
    (["--lora_diff_path", "missing.pt", "--format", "gguf"], "persona LoRA diff not found: missing.pt"),
    (["--vector_path", "missing.pt", "--layer", "5", "--format", "gguf_control_vector"], "persona vector not found: missing.pt"),
    (["--lora_diff_path", "missing.pt", "--format", "gguf", "--coef", "2"], "--coef is for --format peft only"),
    (["--vector_path", "missing.pt", "--format", "gguf_control_vector"], "needs --vector_path and --layer"),
])
def test_missing_inputs_and_wrong_flags_are_refused(flags, message, tmp_path, capsys, monkeypatch, no_model_loads):
    monkeypatch.chdir(tmp_path)
    refused(capsys, tmp_path, *flags, "--output", tmp_path / "x.gguf", message=message)
