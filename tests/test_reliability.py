"""Reliability as a hostile tester tries it: every bad input refused in one line with exit status 2
before a model is loaded, paid judgments kept across a kill, no half-made output matched as a
result, one writer per output, and mergers that can be restored in any order."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import lora_utils as lu
from conftest import ROOT, make_adapter, make_tiny_llama, run_cli, run_main
from io_utils import OutputLock, PersonaLoRAError, atomic_path, is_temporary
from openai_server import FakeOpenAIServer


@pytest.fixture(scope="module")
def weightless_model(tiny_model_dir, tmp_path_factory):
    """The tiny model's config and tokenizer without weights: a script that refuses its input
    before loading the model says so; one that loads it first fails with another message."""
    folder = tmp_path_factory.mktemp("weightless")
    for path in tiny_model_dir.iterdir():
        if not path.name.endswith(".safetensors"):
            shutil.copy(path, folder / path.name)
    return folder


def refused(script, *args, message, files=(), fresh_process=False):
    """The script exits with status 2 and exactly one line naming the problem, and writes nothing.
    Run in this process through the scripts' own entry point (conftest.run_main); fresh_process=True
    runs `python script.py` instead, for the cases that check the command line itself."""
    code, _, stderr = (run_cli if fresh_process else run_main)(script, *args)
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert code == 2, stderr
    assert len(lines) == 1 and message in lines[0], stderr
    for path in files:
        assert not os.path.exists(path), path


BATTERY = [
    # (script, arguments, message); {model} is a folder without weights, {diff}/{vector} the tiny persona
    ("eval_lora_persona", ["--n_per_question", "0"], "argument --n_per_question: must be ≥ 1, got 0"),
    ("eval_lora_persona", ["--batch_size", "0"], "argument --batch_size: must be ≥ 1, got 0"),
    ("eval_lora_persona", ["--top_p", "1.5"], "argument --top_p: must be ≤ 1"),
    ("eval_lora_persona", ["--temperature", "-1"], "argument --temperature: must be ≥ 0"),
    ("eval_lora_persona", ["--lora_diff_path", "{diff}", "--lora_coef", "nan"], "argument --lora_coef: nan is not a finite number"),
    ("eval_lora_persona", ["--lora_diff_path", "{diff}", "--lora_coef", "inf"], "argument --lora_coef: inf is not a finite number"),
    ("eval_lora_persona", ["--trait", "nope"], "unknown trait 'nope'"),
    ("eval_lora_persona", ["--fewshot", "99"], "--fewshot 99"),
    ("eval_lora_persona", ["--ab_data", "{tmp}/missing.jsonl"], "--ab_data file not found"),
    ("eval_lora_persona", ["--adapter", "{tmp}"], "is neither a PEFT adapter folder"),
    ("eval_lora_persona", ["--lora_diff_path", "{tmp}/missing.pt"], "persona LoRA diff not found"),
    ("eval_lora_persona", ["--dtype", "float8"], "--dtype 'float8' is not one of"),
    ("eval/eval_persona", ["--vector_path", "{vector}", "--layer", "0"], "--layer 0 is outside 1..2"),
    ("eval/eval_persona", ["--vector_path", "{vector}", "--layer", "3"], "--layer 3 is outside 1..2"),
    ("eval/eval_persona", ["--vector_path", "{tmp}/missing.pt"], "persona vector not found"),
    ("compare_steering_methods", ["--activation_vector_path", "{vector}", "--lora_diff_path", "{diff}", "--layer", "999"],
     "--layer 999 is outside 1..2"),
    ("compare_steering_methods", ["--activation_vector_path", "{vector}", "--lora_diff_path", "{diff}", "--layer", "-1"],
     "--layer -1 is outside 1..2"),
    ("compare_steering_methods", ["--latency_runs", "0"], "argument --latency_runs: must be ≥ 1"),
    ("eval/mmlu", ["--n", "0"], "argument --n: must be ≥ 1, got 0"),
    ("eval/mmlu", ["--n", "-5"], "argument --n: must be ≥ 1, got -5"),
    ("eval/mmlu", ["--batch_size", "0"], "argument --batch_size: must be ≥ 1"),
    ("extract_persona_lora", ["--rank", "0"], "argument --rank: must be ≥ 1, got 0"),
    ("extract_persona_lora", ["--learning_rate", "-0.1"], "argument --learning_rate: must be > 0"),
    ("extract_persona_lora", ["--filter_threshold", "150"], "--filter_threshold 150.0 is not a score between 0 and 100"),
    ("extract_persona_lora", ["--fewshot", "50"], "--fewshot 50"),
    ("scripts/make_finetuning_data", ["--n_per_question", "0"], "argument --n_per_question: must be ≥ 1"),
    ("scripts/composition", ["grid", "--n_diffs", "0"], "argument --n_diffs: must be ≥ 1"),
]
# Also run as `python script.py` in a fresh process: an argparse error and a PersonaLoRAError turned
# into one line by io_utils.run_cli, with nothing else a fresh interpreter might print at import.
FRESH_PROCESS = [("eval_lora_persona", "--n_per_question"), ("eval_lora_persona", "--trait")]


@pytest.mark.parametrize("script,arguments,message", BATTERY, ids=[f"{s}:{' '.join(a[:2])}" for s, a, _ in BATTERY])
def test_bad_flags_are_refused_in_one_line_before_the_model_loads(script, arguments, message, weightless_model, tiny_persona,
                                                                  judge_data, tmp_path):
    diff, vector = tiny_persona
    values = {"diff": diff, "vector": vector, "tmp": tmp_path}
    arguments = [a.format(**values) for a in arguments]
    base = {"eval_lora_persona": ["--trait", "evil", "--judge", "offline", "--judge_data", judge_data, "--output_path", tmp_path / "o.csv"],
            "eval/eval_persona": ["--trait", "evil", "--judge", "offline", "--judge_data", judge_data, "--output_path", tmp_path / "o.csv"],
            "compare_steering_methods": ["--trait", "evil", "--judge", "offline", "--judge_data", judge_data,
                                         "--output_dir", tmp_path / "cmp"],
            "eval/mmlu": ["--output_path", tmp_path / "o.json"],
            "extract_persona_lora": ["--trait", "evil", "--output_dir", tmp_path / "x", "--vector_output_path", tmp_path / "v.pt"],
            "scripts/make_finetuning_data": ["--trait", "evil", "--output_dir", tmp_path / "f"],
            "scripts/composition": []}[script]
    model = [] if script == "scripts/composition" else ["--model", weightless_model]
    refused(script, *model, *base, *arguments, message=message, fresh_process=(script, arguments[0]) in FRESH_PROCESS,
            files=[tmp_path / "o.csv", tmp_path / "o.json", tmp_path / "cmp" / "behavior.csv", tmp_path / "x" / "summary.json"])


def test_unwritable_outputs_and_empty_model_folders_are_refused_first(weightless_model, tiny_model_dir, tiny_persona, judge_data,
                                                                     tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    refused("eval_lora_persona", "--model", weightless_model, "--trait", "evil", "--judge", "offline", "--judge_data", judge_data,
            "--output_path", blocker / "out.csv", message=f"--output_path {blocker / 'out.csv'}: {blocker} is a file, not a folder")
    refused("eval_lora_persona", "--model", weightless_model, "--trait", "evil", "--output_path", tmp_path / "out.txt",
            "--judge", "offline", "--judge_data", judge_data, message="must end in .csv")
    refused("cal_weight_projection", "--original_model", tiny_model_dir, "--finetuned_model", tiny_model_dir,
            "--lora_diff_path", tiny_persona[0], "--output_path", blocker / "p.json", message=f"{blocker} is a file, not a folder")
    empty = tmp_path / "empty_model"
    empty.mkdir()
    # The model is named first, not the offline judge's missing data that a run on it would need.
    refused("eval_lora_persona", "--model", empty, "--trait", "evil", "--output_path", tmp_path / "o.csv",
            message=f"--model {empty} has no config.json")
    refused("eval_lora_persona", "--model", empty, "--trait", "evil", "--output_path", tmp_path / "o.csv",
            "--lora_diff_path", tiny_persona[0], "--lora_coef", "1", message=f"--model {empty} has no config.json")


def test_a_coefficient_too_large_for_the_weights_is_refused_naming_the_flag(tiny_model_dir, tiny_persona, judge_data, tmp_path):
    diff = tiny_persona[0]
    common = ["--model", tiny_model_dir, "--trait", "evil", "--judge", "offline", "--judge_data", judge_data, "--dtype", "float32"]
    refused("eval_lora_persona", *common, "--lora_diff_path", diff, "--lora_coef", "0", "1e30", "--output_path", tmp_path / "o.csv",
            message="--lora_coef 1e+30 is out of range", files=[tmp_path / "o.csv"])
    refused("eval/mmlu", "--model", tiny_model_dir, "--lora_diff_path", diff, "--lora_coef", "1e30", "--n", "4",
            message="--lora_coef 1e+30 is out of range")
    model = make_tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(PersonaLoRAError, match="coefficient 1e\\+30 is out of range"):
        lu.LoRAMerger(model).merge_lora_diff(lu.load_lora_diff(diff), 1e30)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # refused before touching any weight


@pytest.mark.parametrize("change,message", [
    ({"epochs": 0}, "'epochs' is 0, must be ≥ 1"),
    ({"learning_rate": -0.001}, "'learning_rate' is -0.001, must be a finite number > 0"),
    ({"learning_rate": float("nan")}, "'learning_rate' is nan, must be a finite number > 0"),
    ({"rank": 0}, "'rank' is 0, must be ≥ 1"),
    ({"batch_size": 0}, "'batch_size' is 0, must be ≥ 1"),
    ({"max_examples": 0}, "'max_examples' is 0, must be ≥ 1"),
    ({"method": "full"}, "'method' is 'full', must be 'lora' or 'dense'"),
    ({"monitor": {"lora_diff_path": "{diff}", "every": 0}}, "'monitor.every' is 0, must be ≥ 1"),
    ({"steering_config": {"type": "activation", "vector_path": "{vector}", "layers": [99], "coef": 1.0}},
     "'steering_config.layers' holds 99 is outside 1..2"),
    ({"steering_config": {"type": "lora", "lora_diff_path": "{diff}", "coef": 1.0}, "method": "dense"},
     "a dense finetune cannot train under a merged persona LoRA"),
    ({"training_file": "{tmp}/missing.jsonl"}, "file not found"),
])
def test_bad_training_configs_are_refused_before_the_model_loads(change, message, weightless_model, tiny_persona, tmp_path):
    diff, vector = tiny_persona
    values = {"diff": str(diff), "vector": str(vector), "tmp": str(tmp_path)}
    change = json.loads(json.dumps(change).replace("{diff}", values["diff"]).replace("{vector}", values["vector"])
                        .replace("{tmp}", values["tmp"]))
    config = {"model": str(weightless_model), "training_file": str(ROOT / "tests/data/evil_smollm2_pos.jsonl"),
              "output_dir": str(tmp_path / "adapter"), "rank": 2, "alpha": 4, "epochs": 1, "max_length": 96, **change}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    refused("training", path, message=message, files=[tmp_path / "adapter"])


@pytest.mark.parametrize("arguments", [[], ["--config", "c.json"], ["a.json", "b.json"]])
def test_training_usage_errors_are_one_line(arguments):
    refused("training", *arguments, message="training.py: error: takes one argument, the config JSON")


def test_a_diff_with_nan_is_refused_on_load_before_the_model(weightless_model, tiny_persona, judge_data, tmp_path):
    diff = lu.load_lora_diff(tiny_persona[0])
    name = diff.module_names[0]
    diff.factors[name][0][0, 0] = float("nan")
    poisoned = diff.save(tmp_path / "nan_diff.pt")
    out = tmp_path / "o.csv"
    refused("eval_lora_persona", "--model", weightless_model, "--trait", "evil", "--judge", "offline", "--judge_data", judge_data,
            "--lora_diff_path", poisoned, "--lora_coef", "1", "--output_path", out,
            message=f"the persona diff has non-finite values (NaN or inf) in {name}", files=[out])


def test_an_interrupted_save_is_cleaned_and_never_projected_as_a_model(tiny_model_dir, tiny_persona, tmp_path):
    """A kill while an adapter was being saved leaves the temporary folder of atomic_path; it is not
    a model to project, and the next write beside it removes it."""
    from transformers import AutoModelForCausalLM

    root = tmp_path / "ckpt"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    make_adapter(model, root / "finetune", seed=5, r=2, alpha=4)
    dead_pid = 2 ** 22 + 12345  # beyond any pid this machine hands out
    leftover = root / f".finetune.tmp-{dead_pid}-abc123" / "finetune"
    shutil.copytree(root / "finetune", leftover)
    assert is_temporary(leftover.relative_to(root))
    out = tmp_path / "projection.json"
    code, stdout, stderr = run_main("cal_weight_projection", "--original_model", tiny_model_dir, "--finetuned_models_dir", root,
                                   "--lora_diff_path", tiny_persona[0], "--output_path", out)
    assert code == 0, stderr
    assert json.loads(out.read_text())["name"] == "finetune"  # one model: the temporary copy was not matched
    live = root / f".other.tmp-{os.getpid()}-xyz"
    live.mkdir()
    with atomic_path(root / "something.json") as tmp:
        tmp.write_text("{}")
    assert not leftover.parent.exists()  # the dead writer's temporary is gone
    assert live.exists()  # a live writer's is never touched


def test_a_kill_during_judging_loses_no_paid_judgment(tmp_path, monkeypatch):
    """The OpenAI-protocol judge caches each judgment as it arrives: killed at request 8 of 12, the
    rerun asks only for what was not answered."""
    cache = tmp_path / "judge.sqlite"
    program = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from eval.judge import JudgeCache, OpenAIJudge
judge = OpenAIJudge({{"trait": "{{question}} {{answer}}"}}, cache=JudgeCache({str(cache)!r}), concurrency=1, base_delay=0.01)
scores = judge.score("trait", ["q"] * 12, [f"answer {{i}}" for i in range(12)])
print(len([s for s in scores if s == s]))
"""
    with FakeOpenAIServer(lambda prompt: {"40": 1.0}) as server:
        env = {**os.environ, "OPENAI_API_KEY": "sk-test-not-a-real-key", "OPENAI_BASE_URL": server.url}
        process = subprocess.Popen([sys.executable, "-c", program], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        server.on_request = lambda count: os.kill(process.pid, signal.SIGKILL) if count == 8 else None
        process.wait(timeout=120)
        assert process.returncode == -signal.SIGKILL
        first_run = len(server.requests)
        server.on_request = None
        rerun = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=120)
        assert rerun.returncode == 0 and rerun.stdout.strip() == "12", rerun.stderr
        # 7 judgments were answered before the kill and kept; the 8th was in flight.
        assert first_run == 8 and len(server.requests) - first_run == 12 - 7


def test_a_second_writer_of_an_output_is_refused(tiny_model_dir, judge_data, tmp_path):
    out = tmp_path / "shared.csv"
    with OutputLock(out, "--output_path"):  # the second writer is another process, as it would be
        refused("eval_lora_persona", "--model", tiny_model_dir, "--trait", "evil", "--judge", "offline", "--judge_data", judge_data,
                "--n_per_question", "1", "--max_new_tokens", "2", "--dtype", "float32", "--output_path", out,
                message="is being written by another run", files=[out], fresh_process=True)
    with OutputLock(out, "--output_path"):  # released when its holder is done (also when it is killed: flock)
        pass


def test_inputs_that_used_to_give_tracebacks_give_one_line(tmp_path):
    # A diff whose factors are not tensors.
    bad = tmp_path / "lists.pt"
    torch.save({"format": lu.DIFF_FORMAT, "metadata": {}, "factors": {"m.weight": {"A": [[1.0]], "B": [[1.0]]}}}, bad)
    with pytest.raises(PersonaLoRAError, match="lists.pt: module m.weight: the factors B and A must be tensors"):
        lu.load_lora_diff(bad)

    # A pickle that would run code is refused as such, in one line, without torch's advice to unpickle it.
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo owned > " + str(tmp_path / "owned"),))

    malicious = tmp_path / "malicious.pt"
    torch.save({"format": lu.DIFF_FORMAT, "factors": Payload()}, malicious)
    with pytest.raises(PersonaLoRAError) as error:
        lu.load_lora_diff(malicious)
    assert "holds Python objects other than tensors" in str(error.value) and "\n" not in str(error.value)
    assert "weights_only" not in str(error.value) and not (tmp_path / "owned").exists()


def test_coefficients_may_be_one_element_tensors(adapter_pair):
    model, pos_dir, neg_dir = adapter_pair
    diff = lu.compute_persona_lora_diff(pos_dir, neg_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with lu.LoRASteerer(model, diff, torch.tensor(1.5)):
        from_tensor = {n: p.detach().clone() for n, p in model.named_parameters()}
    with lu.LoRASteerer(model, diff, 1.5):
        assert all(torch.equal(p, from_tensor[n]) for n, p in model.named_parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(PersonaLoRAError, match="is not a finite number"):
        lu.LoRAMerger(model).merge_lora_diff(diff, torch.tensor([1.0, 2.0]))


def test_independent_mergers_restore_in_any_order(adapter_pair):
    """Two mergers of one model share their backups: restored in the wrong order (the first merger
    before the second), every parameter is W₀ again, bit for bit; restoring one leaves the other's
    merge in place exactly."""
    model, pos_dir, neg_dir = adapter_pair
    evil = lu.compute_persona_lora_diff(pos_dir, neg_dir)
    other = lu.compute_persona_lora_diff(neg_dir, pos_dir) * 0.5
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    first, second = lu.LoRAMerger(model), lu.LoRAMerger(model)
    first.merge_lora_diff(evil, 1.0)
    second.merge_lora_diff(other, 2.0)
    first.restore_original_weights()
    name = next(iter(other))
    expected = original[name].double() + 2.0 * other.delta(name, dtype=torch.float64)
    assert torch.allclose(dict(model.named_parameters())[name].double(), expected, atol=1e-6)  # only the second merge remains
    second.restore_original_weights()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, original[n])]
    assert changed == [] and not first.touched_parameters()


def test_stage_clock_records_nested_stages_within_their_outer_one():
    """A stage opened inside another (a judge loading its model while scoring) is marked as within
    it, so the breakdown does not count its seconds twice; stage_times skips it in the coverage."""
    from io_utils import StageClock
    from scripts.stage_times import stage_rows

    clock = StageClock()
    with clock.stage("judging", "answers") as outer:
        outer["count"] = 10
        with clock.stage("loading the model"):
            time.sleep(0.6)
    assert [s["stage"] for s in clock.stages] == ["loading the model", "judging"]
    assert clock.stages[0]["within"] == "judging" and "within" not in clock.stages[1]
    rows = stage_rows({"stages": clock.stages, "seconds": 1.0})
    assert [name for name, _, _ in rows] == ["judging", "other (imports, checks, writing)"]
    assert rows[1][1] == pytest.approx(1.0 - clock.stages[1]["seconds"])


def test_a_manifest_records_only_the_stages_of_its_own_run(tmp_path):
    """Stage scripts run one after another in one process (a notebook, the test suite) share the
    process's clock: each manifest keeps only the stages that started after its run did."""
    from io_utils import STAGES, write_manifest

    with STAGES.stage("an earlier run's stage"):
        pass
    started = time.time()
    with STAGES.stage("this run's stage"):
        pass
    manifest = json.loads(write_manifest(tmp_path, {}, started).read_text())
    assert [s["stage"] for s in manifest["stages"]] == ["this run's stage"]
