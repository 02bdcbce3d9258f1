"""export_persona.py: GGUF LoRA adapters and control vectors checked in llama.cpp itself, the PEFT
route, and the refusals (one line, exit status 2, nothing written, no model loaded)."""

import dataclasses
import sys

import gguf
import numpy as np
import pytest
import torch

from conftest import run_script

import gguf_export
import io_utils
import lora_utils as lu

# On the float32 copy of the GGUF the runtimes differ by float rounding (~1e-6 nats): a right
# export stays at that level (measured ≤ 1.5× it), a wrong one is thousands of times above.
EXACT_TOLERANCE = 10.0
# On the 4-bit GGUF a right export differs from transformers by about the base model's own gap
# between the runtimes. For a random diff, GAP_TOLERANCE × it, not 1.2×: a random steering moves the
# model to where the 4-bit arithmetic weighs more (the synthetic diff at α = 2 measures 1.9× the gap,
# 1.8–2.0× on each of 14 other conversations) while the same export is exact on the float32 copy.
GAP_TOLERANCE = 2.5
# The bound, on a trained persona where it held: the demo's evil diff cut to its top 2
# singular directions per module (1.3 MB, tests/data/README.md) and its vector. Measured 1.02×
# (α = 1) and 0.92× (α = 2); the full-rank diff 1.12× and 0.92×, its vector 0.94× and 0.96×. Not
# every right export meets it on the 4-bit file (the hallucination LoRA: 2.2× and 3.0×, exact on
# float32; RESULTS.md), so this guards a regression; the float32 check tells right from wrong.
PERSONA_GAP_TOLERANCE = 1.2
SYNTHETIC_DIFF_NORM = 0.03  # ‖ΔW‖ = 0.03·‖W‖ per module: steering KL ~20× (α = 1) and ~80× (α = 2) the gap
SYNTHETIC_VECTOR_NORM = 0.25  # ‖v[ℓ]‖ = 0.25 × the median norm of hidden_states[ℓ]


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
def no_model_loads(monkeypatch, tmp_path):
    """Fail the test if anything loads model weights (only configs may be read), on an empty model
    cache as on a fresh machine: the embedded default is not converted yet, and a refusal must not convert it."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setenv("PERSONA_LORAS_CACHE", str(tmp_path / "empty_model_cache"))


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


# --- what the files hold ---------------------------------------------------------------------


def test_shipped_persona_is_the_compressed_diff_with_its_sources_recorded(tiny_persona, tmp_path):
    """scripts/ship_test_persona.py (how tests/data's trained persona is remade): the best rank-r
    cut per module in float16, the sources' hashes and the energy kept in its metadata."""
    diff_path, vector_path = tiny_persona
    assert run_script("scripts.ship_test_persona", "--lora_diff_path", diff_path, "--vector_path", vector_path,
                      "--rank", 1, "--output_dir", tmp_path) == 0
    shipped = lu.load_lora_diff(tmp_path / "evil_persona_rank1.safetensors")
    source = lu.load_lora_diff(diff_path)
    reference = source.compress(1)
    assert set(shipped.factors) == set(source.factors)
    for name, (up, down) in shipped.factors.items():
        assert up.dtype == down.dtype == torch.float16 and up.shape[1] == 1
        torch.testing.assert_close(shipped.delta(name).float(), reference.delta(name).float(), atol=2e-3, rtol=2e-2)
    energy = shipped.metadata["compression"]["energy_kept"]
    assert 0 < energy < 1 and energy == pytest.approx(reference.metadata["compression"]["energy_kept"])
    assert shipped.metadata["source_diff"]["sha256"] == io_utils.file_identity(diff_path)["sha256"]
    assert torch.equal(torch.load(tmp_path / "evil_response_avg_diff.pt", weights_only=True), torch.load(vector_path, weights_only=True))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left




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


def test_an_unwritable_output_is_refused(tiny_persona, tiny_model_dir, tmp_path, capsys, no_model_loads):
    (tmp_path / "a_file").write_text("")
    refused(capsys, tmp_path, "--lora_diff_path", tiny_persona[0], "--model", tiny_model_dir, "--format", "gguf",
            "--output", tmp_path / "a_file" / "x.gguf", message="is a file, not a folder")


@pytest.mark.parametrize("flags, message", [
    (["--lora_diff_path", "missing.pt", "--format", "gguf"], "persona LoRA diff not found: missing.pt"),
    (["--vector_path", "missing.pt", "--layer", "5", "--format", "gguf_control_vector"], "persona vector not found: missing.pt"),
    (["--lora_diff_path", "missing.pt", "--format", "gguf", "--coef", "2"], "--coef is for --format peft only"),
    (["--vector_path", "missing.pt", "--format", "gguf_control_vector"], "needs --vector_path and --layer"),
])
def test_missing_inputs_and_wrong_flags_are_refused(flags, message, tmp_path, capsys, monkeypatch, no_model_loads):
    monkeypatch.chdir(tmp_path)
    refused(capsys, tmp_path, *flags, "--output", tmp_path / "x.gguf", message=message)


# --- in llama.cpp itself ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def runtimes():
    """The embedded model in transformers (float32), llama.cpp on its own 4-bit GGUF and on a
    float32 copy of it, and the token ids of the check's conversations. One thread each: the check
    is deterministic and immune to other work on the cores."""
    from eval import llama_cpp_runtime as rt
    from model_loading import embedded_gguf_file, load_model_and_tokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tokenizer = load_model_and_tokenizer(None, dtype="float32")
    quantized, exact = rt.LlamaCppRuntime(embedded_gguf_file()), rt.LlamaCppRuntime(rt.embedded_float32_gguf())
    yield model, quantized, exact, rt.check_sequences(tokenizer)
    quantized.close()
    exact.close()
    torch.set_num_threads(threads)


def report(results):
    for label, result in results.items():
        print(f"\n{label}: gap {result['quantisation_gap']:.2e}; " + "; ".join(
            f"{c:g}: KL {v['kl']:.2e} ({v['ratio_to_gap']:.2f}× gap), steering {v['steering_kl']:.4f}, r {v['correlation']:.3f}"
            for c, v in result["coefficients"].items()))


def check(results, right: str, wrong: str, tolerance: float):
    """The right export within `tolerance` × the runtimes' own gap at every coefficient, the wrong
    one beyond it at every coefficient, and the steering itself far above the gap."""
    for coefficient, values in results[right]["coefficients"].items():
        gap = results[right]["quantisation_gap"]
        assert values["steering_kl"] > 10 * gap, (right, coefficient, values)
        assert values["kl"] <= tolerance * gap, (right, coefficient, values, gap)
        assert values["correlation"] > 0.9, (right, coefficient, values)
        assert results[wrong]["coefficients"][coefficient]["kl"] > tolerance * gap, (wrong, coefficient, results[wrong])


@pytest.mark.embedded
def test_gguf_lora_in_llama_cpp_matches_the_merged_model(runtimes, tmp_path):
    from eval import llama_cpp_runtime as rt

    model, quantized, exact, sequences = runtimes
    diff = rt.synthetic_diff(model, relative_norm=SYNTHETIC_DIFF_NORM)  # random: a known steering size, no trait
    diff_path = diff.save(tmp_path / "synthetic_lora_diff.pt", safetensors_twin=False)
    assert run_script("export_persona", "--lora_diff_path", diff_path, "--format", "gguf", "--output", tmp_path / "right.gguf") == 0
    # Negative control: the q/k rows left in transformers' order.
    layout = dataclasses.replace(gguf_export.gguf_layout(None), permute_qk=False)
    wrong = gguf_export.write_lora_gguf(diff, tmp_path / "unpermuted.gguf", layout)
    results = rt.lora_export_agreement(model, sequences, diff, {
        "Q4_1": (quantized, tmp_path / "right.gguf"), "Q4_1, no q/k permutation": (quantized, wrong),
        "float32": (exact, tmp_path / "right.gguf"), "float32, no q/k permutation": (exact, wrong)}, (1.0, 2.0))
    report(results)
    check(results, "float32", "float32, no q/k permutation", EXACT_TOLERANCE)
    check(results, "Q4_1", "Q4_1, no q/k permutation", GAP_TOLERANCE)


@pytest.mark.embedded
def test_control_vector_in_llama_cpp_matches_activation_steering(runtimes, tmp_path):
    from eval import llama_cpp_runtime as rt

    model, quantized, exact, sequences = runtimes
    layer = 15
    vector = rt.synthetic_vector(model, sequences, relative_norm=SYNTHETIC_VECTOR_NORM)
    torch.save(vector, tmp_path / "synthetic_vector.pt")
    assert run_script("export_persona", "--vector_path", tmp_path / "synthetic_vector.pt", "--layer", layer,
                      "--format", "gguf_control_vector", "--output", tmp_path / "right.gguf") == 0
    # Negative control: v[ℓ] added one block late (direction.ℓ, the natural off-by-one).
    wrong = gguf_export.write_directions({layer: vector[layer]}, tmp_path / "late.gguf", gguf_export.gguf_layout(None))
    results = rt.control_vector_agreement(model, sequences, vector, layer, {
        "Q4_1": (quantized, tmp_path / "right.gguf"), "Q4_1, one block late": (quantized, wrong),
        "float32": (exact, tmp_path / "right.gguf"), "float32, one block late": (exact, wrong)}, (1.0, 2.0))
    report(results)
    check(results, "float32", "float32, one block late", EXACT_TOLERANCE)
    check(results, "Q4_1", "Q4_1, one block late", GAP_TOLERANCE)


@pytest.mark.embedded
def test_a_trained_persona_in_llama_cpp_stays_within_the_quantisation_gap(runtimes, tmp_path):
    """The issue's check on a trained persona: KL(transformers with α·ΔW merged ‖ llama.cpp with the
    exported LoRA at scale α) ≤ 1.2 × the runtimes' own gap at α = 1 and 2 on the 4-bit GGUF, and
    the same for the persona vector as a control vector against activation steering at layer 20."""
    from conftest import ROOT
    from eval import llama_cpp_runtime as rt

    model, quantized, exact, sequences = runtimes
    path = ROOT / "tests/data/evil_persona_rank2.safetensors"
    shipped = lu.load_lora_diff(path)
    assert shipped.metadata["trait"] == "evil" and "485e276" in shipped.metadata["provenance"]
    assert all(up.dtype == torch.float16 and up.shape[1] == 2 for up, _ in shipped.factors.values()) and len(shipped) == 210
    assert run_script("export_persona", "--lora_diff_path", path, "--format", "gguf", "--output", tmp_path / "evil.gguf") == 0
    diff = lu.PersonaLoRADiff({name: (up.float(), down.float()) for name, (up, down) in shipped.factors.items()}, shipped.metadata)
    vector_path = ROOT / "tests/data/evil_response_avg_diff.pt"
    assert run_script("export_persona", "--vector_path", vector_path, "--layer", 20, "--format", "gguf_control_vector",
                      "--output", tmp_path / "evil_vector.gguf") == 0
    results = {**rt.lora_export_agreement(model, sequences, diff, {"LoRA, Q4_1": (quantized, tmp_path / "evil.gguf"),
                                                                   "LoRA, float32": (exact, tmp_path / "evil.gguf")}, (1.0, 2.0)),
               **rt.control_vector_agreement(model, sequences, torch.load(vector_path, weights_only=True), 20, {
                   "vector, Q4_1": (quantized, tmp_path / "evil_vector.gguf"),
                   "vector, float32": (exact, tmp_path / "evil_vector.gguf")}, (1.0, 2.0))}
    report(results)
    for label, tolerance in (("LoRA, Q4_1", PERSONA_GAP_TOLERANCE), ("vector, Q4_1", PERSONA_GAP_TOLERANCE),
                             ("LoRA, float32", EXACT_TOLERANCE), ("vector, float32", EXACT_TOLERANCE)):
        gap = results[label]["quantisation_gap"]
        for coefficient, values in results[label]["coefficients"].items():
            assert values["steering_kl"] > 10 * gap, (label, coefficient, values)
            assert values["kl"] <= tolerance * gap, (label, coefficient, values, gap)
            assert values["correlation"] > 0.9, (label, coefficient, values)
