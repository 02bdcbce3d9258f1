"""The repository's shape holds: the library imports from any folder once installed, no stage
script is imported by another module, nothing edits sys.path outside the tests, and the small
defects a maintainer found stay fixed."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_script

STAGE_SCRIPTS = {"extract_persona_lora", "eval_lora_persona", "cal_weight_projection", "compare_steering_methods", "training",
                 "distill_steering_lora", "export_persona"}


def python_files():
    return [p for p in ROOT.rglob("*.py") if not any(part.startswith(".") for part in p.relative_to(ROOT).parts)
            and p.relative_to(ROOT).parts[0] not in ("tests", "build")]


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_no_stage_script_is_imported_by_another_module():
    offenders = [(str(p.relative_to(ROOT)), sorted(imported_modules(p) & STAGE_SCRIPTS)) for p in python_files()
                 if imported_modules(p) & STAGE_SCRIPTS]
    assert offenders == []


def test_nothing_outside_the_tests_edits_sys_path():
    assert [str(p.relative_to(ROOT)) for p in python_files() if "sys.path.insert" in p.read_text()
            or "sys.path.append" in p.read_text()] == []


def test_the_library_imports_from_any_folder(tmp_path):
    """After `pip install -e .` (scripts/setup_env.sh does it), a notebook anywhere imports it."""
    result = subprocess.run([sys.executable, "-c", "import lora_utils, trainer, eval.generation; print(lora_utils.__file__)"],
                            cwd=tmp_path, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).resolve() == (ROOT / "lora_utils.py").resolve()


def test_peft_export_never_deletes_a_folder_that_is_not_an_adapter(adapter_pair, tmp_path):
    import lora_utils as lu
    from io_utils import PersonaLoRAError

    _, pos_dir, neg_dir = adapter_pair
    diff = lu.compute_persona_lora_diff(pos_dir, neg_dir)
    results = tmp_path / "results"
    results.mkdir()
    (results / "table.csv").write_text("precious\n")
    with pytest.raises(PersonaLoRAError, match="is not an earlier export of a persona diff"):
        diff.to_peft_adapter(results)
    assert (results / "table.csv").read_text() == "precious\n"
    with pytest.raises(PersonaLoRAError, match="is not an earlier export"):  # a trained adapter is somebody's finetune
        diff.to_peft_adapter(pos_dir)
    assert (pos_dir / "adapter_config.json").is_file()
    exported = diff.to_peft_adapter(tmp_path / "export")
    assert diff.to_peft_adapter(exported, coefficient=2.0) == exported  # an adapter folder is replaced by the new export


def test_compare_names_an_unknown_trait_and_a_refused_run_leaves_no_output_folder(tiny_model_dir, tiny_persona, tmp_path):
    from io_utils import PersonaLoRAError

    diff_path, vector_path = tiny_persona
    output_dir = tmp_path / "never_made"
    with pytest.raises(PersonaLoRAError, match="unknown trait 'nope'"):
        run_script("compare_steering_methods", "--model", tiny_model_dir, "--trait", "nope", "--output_dir", output_dir)
    with pytest.raises(PersonaLoRAError, match="--layer 999 is outside"):
        run_script("compare_steering_methods", "--model", tiny_model_dir, "--trait", "evil", "--activation_vector_path",
                   vector_path, "--lora_diff_path", diff_path, "--layer", "999", "--output_dir", output_dir)
    assert not output_dir.exists()
