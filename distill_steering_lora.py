"""Stage 5: distil activation steering into a LoRA. The core hypothesis, tested head-on: is there a
low-rank update W ← W + ΔW that reproduces the model steered by h[ℓ] ← h[ℓ] + c·v[ℓ]?

    python distill_steering_lora.py --trait evil --layer 20 --coef 2.0 --rank 4 --output_dir results/distill_evil \\
        --vector_path persona_vectors/SmolLM2-135M-Instruct/evil_response_avg_diff.pt

The teacher is the plain model with Persona Vectors' activation steering on (--steering_type
response: c·v[ℓ] added to block ℓ−1's output at every generated token); the student is the same
model with a LoRA of rank r (lora_alpha = r, so its update is exactly B·A) on --target_modules of
--layers, trained with AdamW to minimise KL(teacher ‖ student) between next-token distributions,
plus --hidden_weight λ times the normalised squared error of the hidden states after layer ℓ. One
model is in memory: teacher passes run with the adapter disabled and the steering hook on.

Data: the trait's extraction and finetuning questions, each answered by the teacher itself
(sampled once with the steering on, cached in --teacher_dir and resumable), read teacher-forced;
the loss covers the answer's positions from the last prompt token on, which is where response
steering acts. The last --heldout_fraction of each of the two question sets is never trained on
and measures the result; the trait's evaluation questions are not read at all, so every stage that
evaluates on them stays clean. A weight update acts on the prompt's positions too, where response
steering does not: what the distilled model leaves of KL(steered ‖ plain) includes that mismatch.

Writes, under --output_dir:
    <trait>_distilled_lora_diff.pt (+ .safetensors)  the learned update as a persona diff, so LoRAMerger,
                    eval_lora_persona.py, cal_weight_projection.py and compare_steering_methods.py take it
    summary.json    held-out KL(steered ‖ plain) and KL(steered ‖ distilled), their ratio and the fraction
                    reproduced; the training curve (loss per step, held-out KL every --eval_every steps); the
                    update's norm by layer and module type and how much of v its residual writes hold; its
                    weight-space cosine with the persona diff and the --control_diff_paths; what it does
                    beside the steering and the persona diff (functional: the residual-stream change each
                    causes at --layer on the held-out answers, compared pair by pair); timings, settings
    manifest.json
    checkpoint.pt   only while training, every --eval_every steps: an interrupted run resumes from it
A rerun with the same settings reuses the finished update (and recomputes only the cosines, and the
functional comparison if the run lacks it).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import lora_utils as lu
from eval.activations import STEERING_TYPES, ActivationSteerer, check_vector_fits, functional_comparison, teacher_forced_response
from eval.generation import ChatSpan, GenerationSettings, answers_identity, cached_generation, identity_key, pad_right, tokenize_chat
from eval.stats import ratio_interval
from eval.traits import load_trait
from io_utils import ArgumentParser, OutputLock, PersonaLoRAError, atomic_path, check_writable_dir, file_identity
from io_utils import finite_float, non_negative_float, non_negative_int, positive_float, positive_int, read_json_object
from io_utils import remove_stale_temporaries, run_cli, unit_interval, write_json, write_manifest
from model_loading import check_dtype, check_model_source, default_persona_paths, is_embedded, load_model_and_tokenizer
from model_loading import model_config, model_label, resolve_dtype
from trainer import init_seed

# o_proj and down_proj are the two modules that write into the residual stream: a rank-r update of
# them adds to the hidden states an r-dimensional family of directions, the very form of c·v. The
# other projections reach the residual only through attention and the MLP's nonlinearity.
RESIDUAL_WRITERS = ["o_proj", "down_proj"]
PLACEMENTS = ("before", "all")
QUESTION_SETS = ("extraction", "finetuning")
# Teacher answers: short on the embedded 135M model on CPU, longer on real models.
GENERATION_DEFAULTS = {"embedded": dict(n_per_question=2, max_new_tokens=48, temperature=0.7, max_length=256),
                       "full": dict(n_per_question=4, max_new_tokens=256, temperature=1.0, max_length=1024)}
CHECKPOINT = "checkpoint.pt"


def parse_args():
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="hub id or local folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--trait", required=True, help="a folder of dataset/: its extraction and finetuning questions are the data")
    parser.add_argument("--output_dir", required=True)
    steering = parser.add_argument_group("the teacher: activation steering")
    steering.add_argument("--vector_path", default=None,
                          help="[L+1, hidden] persona vector (default: persona_vectors/<model>/<trait>_response_avg_diff.pt)")
    steering.add_argument("--layer", type=int, default=None, help="steered layer ℓ, 1..L−1 (default: two thirds of the depth)")
    steering.add_argument("--coef", type=finite_float, default=2.0, help="c in h[ℓ] ← h[ℓ] + c·v[ℓ] (not 0)")
    steering.add_argument("--steering_type", choices=STEERING_TYPES, default="response")
    student = parser.add_argument_group("the student: a LoRA on the plain model")
    student.add_argument("--rank", type=positive_int, default=4)
    student.add_argument("--target_modules", nargs="+", default=RESIDUAL_WRITERS)
    student.add_argument("--layers", nargs="+", default=["before"],
                         help="blocks that get the LoRA: 'before' (0..ℓ−1, whose outputs feed hidden_states[ℓ]), 'all', or indices")
    student.add_argument("--steps", type=positive_int, default=200)
    student.add_argument("--learning_rate", type=positive_float, default=5e-3)
    student.add_argument("--batch_size", type=positive_int, default=4)
    student.add_argument("--hidden_weight", type=non_negative_float, default=0.0,
                         help="λ: add λ × normalised squared error of hidden_states[ℓ+1..L−1] at the answer positions")
    student.add_argument("--eval_every", type=positive_int, default=50, help="held-out KL and a checkpoint every N steps")
    student.add_argument("--heldout_fraction", type=unit_interval, default=0.2,
                         help="the last fraction of each question set, never trained on, measures the result")
    data = parser.add_argument_group("the teacher's answers (defaults: embedded model / real models)")
    data.add_argument("--n_per_question", type=positive_int, help="answers sampled per question (2 / 4)")
    data.add_argument("--max_new_tokens", type=positive_int, help="48 / 256")
    data.add_argument("--temperature", type=positive_float, help="0.7 / 1.0")
    data.add_argument("--top_p", type=unit_interval, default=1.0)
    data.add_argument("--gen_batch_size", type=positive_int, default=32)
    data.add_argument("--max_length", type=positive_int, help="tokens per question and answer (256 / 1024)")
    data.add_argument("--teacher_dir", default=None,
                      help="where the teacher's answers are cached, one file per settings (default: --output_dir); "
                           "a sweep over student settings shares one")
    comparison = parser.add_argument_group("weight-space comparisons")
    comparison.add_argument("--persona_diff_path", default=None,
                            help="default: persona_loras/<model>/<trait>/<trait>_lora_diff.pt, if it exists")
    comparison.add_argument("--control_diff_paths", nargs="*", default=[], help="other traits' diffs: the cosines' controls")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, float32 on CPU), float32, bfloat16")
    args = parser.parse_args()
    for key, value in GENERATION_DEFAULTS["embedded" if is_embedded(args.model) else "full"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.teacher_dir = args.teacher_dir or args.output_dir
    return args


def resolve_layers(spec: list[str], layer: int, num_layers: int) -> list[int]:
    """--layers as block indices: 'before' = 0..ℓ−1, 'all' = 0..L−1, or the given indices."""
    if spec in (["before"], ["all"]):
        return list(range(layer if spec == ["before"] else num_layers))
    indices = []
    for item in spec:
        if item in PLACEMENTS:
            raise PersonaLoRAError(f"--layers {' '.join(spec)}: '{item}' stands alone; give it or block indices, not both")
        try:
            index = int(item)
        except ValueError:
            raise PersonaLoRAError(f"--layers {item!r} is not 'before', 'all' or a block index") from None
        if not 0 <= index < num_layers:
            raise PersonaLoRAError(f"--layers {index} is outside 0..{num_layers - 1}")
        indices.append(index)
    return sorted(set(indices))


def check_inputs(args) -> dict:
    """Everything that can be refused, before the model loads: the trait, the vector and the layer
    against the model's config, the student's settings, the output folders and the diffs."""
    check_model_source(args.model)
    check_dtype(args.dtype)
    trait = load_trait(args.trait)
    args.vector_path = args.vector_path or str(default_persona_paths(args.model, args.trait)[1])
    config = model_config(args.model)
    num_layers = config.num_hidden_layers
    vector, args.layer = check_vector_fits(args.vector_path, config, args.layer)
    if args.coef == 0:
        raise PersonaLoRAError("--coef 0 steers nothing, so there is nothing to distil; give a non-zero coefficient")
    if args.hidden_weight > 0 and args.layer >= num_layers - 1:
        raise PersonaLoRAError(f"--hidden_weight needs a hidden state after --layer {args.layer}, and hidden_states[{num_layers}] "
                               "is read after the final norm; use a lower --layer or --hidden_weight 0")
    if not all(name.strip() for name in args.target_modules):
        raise PersonaLoRAError("--target_modules needs module names such as o_proj down_proj")
    layers = resolve_layers(args.layers, args.layer, num_layers)
    counts = {name: len(getattr(trait, f"{name}_questions")) for name in QUESTION_SETS}
    heldout_from = {name: count - math.ceil(args.heldout_fraction * count) for name, count in counts.items()}
    if not all(heldout_from.values()):
        raise PersonaLoRAError(f"--heldout_fraction {args.heldout_fraction} leaves no question to train on; use a smaller fraction")
    check_writable_dir(args.output_dir, "--output_dir")
    check_writable_dir(args.teacher_dir, "--teacher_dir")
    default_diff = default_persona_paths(args.model, args.trait)[0]
    if args.persona_diff_path is None and default_diff.is_file():
        args.persona_diff_path = str(default_diff)
    comparisons = {path: lu.load_lora_diff(path) for path in [args.persona_diff_path, *args.control_diff_paths] if path}
    return {"trait": trait, "vector": vector, "layers": layers, "num_layers": num_layers, "heldout_from": heldout_from,
            "counts": counts, "comparisons": comparisons}


# ---------------------------------------------------------------------------------------------
# The teacher's answers
# ---------------------------------------------------------------------------------------------


def teacher_jobs(trait, n_per_question: int) -> list[dict]:
    """Every extraction and finetuning question, n_per_question times, with no system prompt: the
    steering alone makes the teacher what it is."""
    jobs = []
    for name in QUESTION_SETS:
        for index, question in enumerate(getattr(trait, f"{name}_questions")):
            for sample in range(n_per_question):
                jobs.append({"id": f"distill-{name}-q{index}-s{sample}", "set": name, "question_index": index, "sample": sample,
                             "messages": [{"role": "user", "content": question}]})
    return jobs


def teacher_identity(args, trait, dtype: torch.dtype) -> dict:
    """What the teacher's answers depend on: the generation settings and the steering."""
    return answers_identity(GenerationSettings.from_flags(args), dtype, args.seed, vector=file_identity(args.vector_path)["sha256"],
                            layer=args.layer, coef=args.coef, steering_type=args.steering_type,
                            trait_file_sha256=hashlib.sha256(trait.path.read_bytes()).hexdigest())


def teacher_answers(args, trait, model, tokenizer, steerer, identity: dict) -> list[dict]:
    """The steered model's answers, sampled once per settings and cached: the file is named after
    the settings, so runs that differ only in the student share it."""
    path = Path(args.teacher_dir) / f"teacher_{identity_key(identity)}.jsonl"
    with OutputLock(path, "--teacher_dir"):
        settings = GenerationSettings.from_flags(args)
        return cached_generation(model, tokenizer, teacher_jobs(trait, args.n_per_question), path, settings,
                                 seed=args.seed, desc="teacher answers (steered)", identity=identity,
                                 while_generating=lambda: steerer)


def split_spans(tokenizer, records: list[dict], heldout_from: dict[str, int],
                max_length: int) -> tuple[list[ChatSpan], list[ChatSpan], list[str]]:
    """(train, held-out) token spans, and each held-out span's question: questions from index
    heldout_from[set] on are held out. An answer whose prompt alone fills max_length has no
    position to learn from and is left out."""
    train, heldout, heldout_questions = [], [], []
    for record in records:
        span = tokenize_chat(tokenizer, record["messages"], max_length)
        if span.response_start >= len(span.ids):
            continue
        if record["question_index"] >= heldout_from[record["set"]]:
            heldout.append(span)
            heldout_questions.append(f"{record['set']}_{record['question_index']}")
        else:
            train.append(span)
    if not train or not heldout:
        raise PersonaLoRAError(f"no {'training' if not train else 'held-out'} answer fits --max_length {max_length}; raise it")
    return train, heldout, heldout_questions


def lora_module_names(model, target_modules: list[str], layers: list[int]) -> list[str]:
    """The linear modules of `layers` whose name ends in one of target_modules; each type must exist."""
    linear = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) and lu.layer_index(name) is not None]
    names = [name for name in linear if lu.module_type(name) in target_modules and lu.layer_index(name) in layers]
    missing = [kind for kind in target_modules if kind not in {lu.module_type(name) for name in names}]
    if missing:
        raise PersonaLoRAError(f"--target_modules {missing[0]} matches no linear module of the chosen layers "
                               f"(this model's: {', '.join(sorted({lu.module_type(name) for name in linear}))})")
    return names


def attach_lora(model, module_names: list[str], rank: int, adapter_init_seed: int):
    """The student: a PEFT LoRA on the named modules, lora_alpha = rank (scale 1, so the update is
    B·A), lora_A drawn from `adapter_init_seed`, B = 0 (the student starts as the plain model)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(adapter_init_seed)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=module_names, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


class Batch:
    """Right-padded spans, each row's answer start (for teacher_forced_response) and the loss
    positions: from the last prompt token (which predicts the answer's first token) to the one
    that predicts what follows the answer."""

    def __init__(self, spans: list[ChatSpan], pad_id: int, device):
        ids, mask = pad_right([span.ids for span in spans], pad_id)
        self.input_ids, self.attention_mask = ids.to(device), mask.to(device)
        self.starts = torch.tensor([span.response_start for span in spans])
        self.positions = torch.zeros_like(ids, dtype=torch.bool)
        for row, span in enumerate(spans):
            self.positions[row, span.response_start - 1:span.response_end] = True
        self.positions = self.positions.to(device)


def forward(model, batch: Batch, hidden: bool):
    """Logits at the loss positions only, flattened to [positions, vocab] (a boolean logits_to_keep):
    the vocabulary projection of every prompt position would be most of the cost of a small model."""
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=hidden, use_cache=False,
                 logits_to_keep=batch.positions)


def teacher_forward(peft_model, steerer, batch: Batch, hidden: bool):
    with torch.no_grad(), peft_model.disable_adapter(), steerer, teacher_forced_response(batch.starts):
        return forward(peft_model, batch, hidden)


def position_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) of the next-token distributions at each position, in float32."""
    teacher = teacher_logits.float().log_softmax(-1)
    student = student_logits.float().log_softmax(-1)
    return (teacher.exp() * (teacher - student)).sum(-1)


def hidden_error(teacher_states, student_states, positions: torch.Tensor, hidden_layers: list[int]) -> torch.Tensor:
    """Σ‖h_student − h_teacher‖² / Σ‖h_teacher‖² over the answer positions, averaged over layers:
    normalised per layer, because hidden states grow with depth (and a few dimensions are huge) and
    a plain squared error would be all about the last layers. hidden_states[ℓ] itself is left out:
    output_hidden_states records block ℓ−1's output before the steering hook adds to it."""
    errors = []
    for index in hidden_layers:
        teacher = teacher_states[index][positions].float()
        errors.append((student_states[index][positions].float() - teacher).pow(2).sum() / teacher.pow(2).sum().clamp_min(1e-12))
    return torch.stack(errors).mean()


@torch.no_grad()
def heldout_kl(peft_model, steerer, spans: list[ChatSpan], pad_id: int, batch_size: int, plain: bool = False) -> dict:
    """Token-weighted mean KL(steered ‖ distilled) over the held-out answers' positions, and with
    `plain` KL(steered ‖ plain) from the same teacher passes; per answer too (sums and positions),
    for errors clustered by question."""
    device = peft_model.get_input_embeddings().weight.device
    per_answer = {"distilled": [], "plain": [], "tokens": []}
    for start in range(0, len(spans), batch_size):
        batch = Batch(spans[start:start + batch_size], pad_id, device)
        counts = batch.positions.sum(1).tolist()  # the flattened positions are in row order
        teacher = teacher_forward(peft_model, steerer, batch, hidden=False).logits
        per_answer["distilled"] += [float(x.sum()) for x in position_kl(teacher, forward(peft_model, batch, False).logits).split(counts)]
        if plain:
            with peft_model.disable_adapter():
                per_answer["plain"] += [float(x.sum()) for x in
                                        position_kl(teacher, forward(peft_model, batch, False).logits).split(counts)]
        per_answer["tokens"] += counts
    tokens = sum(per_answer["tokens"])
    result = {"distilled": sum(per_answer["distilled"]) / tokens, "tokens": tokens, "per_answer": per_answer}
    if plain:
        result["plain"] = sum(per_answer["plain"]) / tokens
    return result


def fraction_interval(per_answer: dict, questions: list[str]) -> dict:
    """The fraction of KL(steered ‖ plain) the LoRA removes, 1 − ΣKL(distilled)/ΣKL(plain), with
    Fieller's interval over held-out questions (an answer's positions are not independent, nor are a
    question's answers): a percentile bootstrap over the dozen or so questions covered ~0.9 at a
    nominal 0.95."""
    sums: dict[str, list[float]] = {}
    for index, question in enumerate(questions):
        sums.setdefault(question, [0.0, 0.0])
        sums[question][0] += per_answer["distilled"][index]
        sums[question][1] += per_answer["plain"][index]
    interval = ratio_interval([d for d, _ in sums.values()], [p for _, p in sums.values()])
    return {"sem": interval["sem"], "ci95": [1 - interval["ci"][1], 1 - interval["ci"][0]], "questions": interval["units"],
            "method": interval["method"] + " of the held-out questions' KL sums"}


def batch_order(n: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Every step's example indices: seeded permutations, concatenated and cut into full batches,
    so every example is seen equally often and a resumed run draws what an uninterrupted one would."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        order += torch.randperm(n, generator=generator).tolist()
    return [order[step * batch_size:(step + 1) * batch_size] for step in range(steps)]


def learning_rate_factor(step: int, steps: int) -> float:
    """Linear warm-up over the first tenth of the steps, then linear decay to zero."""
    warmup = max(1, steps // 10)
    return min(1.0, (step + 1) / warmup, (steps - step) / max(1, steps - warmup))


def distill(peft_model, steerer, train: list[ChatSpan], heldout: list[ChatSpan], *, pad_id: int, steps: int, learning_rate: float,
            batch_size: int, seed: int, eval_every: int, hidden_weight: float = 0.0, hidden_layers: tuple[int, ...] | list[int] = (),
            checkpoint_path: Path | None = None, identity: str | None = None) -> dict:
    """Train the student's LoRA to match the steered teacher; returns the curve:
    {"losses", "kl", "hidden_error", "checkpoints": [{"step", "heldout_kl"}], "training_seconds"}.

    Held-out KL every eval_every steps from step 0 (the plain model: B starts at 0). With
    checkpoint_path, the adapter, the optimizer and the curve are saved after each of those
    measurements and a run with the same identity resumes from them."""
    device = peft_model.get_input_embeddings().weight.device
    trainable = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(trainable.values(), lr=learning_rate, weight_decay=0.0)
    curve = {"losses": [], "kl": [], "hidden_error": [], "checkpoints": [], "training_seconds": 0.0}
    if checkpoint_path is not None and checkpoint_path.is_file():
        saved = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        if saved.get("identity") == identity:
            with torch.no_grad():
                for name, value in saved["adapter"].items():
                    trainable[name].copy_(value)
            optimizer.load_state_dict(saved["optimizer"])
            curve = saved["curve"]
            print(f"resuming from {checkpoint_path} at step {len(curve['losses'])}")
    batches = batch_order(len(train), min(batch_size, len(train)), steps, seed)
    hidden, postfix = hidden_weight > 0, {}
    with tqdm(total=steps, initial=len(curve["losses"]), desc="distilling") as bar:
        for step in range(len(curve["losses"]), steps):
            if step % eval_every == 0 and not any(c["step"] == step for c in curve["checkpoints"]):
                measured = heldout_kl(peft_model, steerer, heldout, pad_id, batch_size)["distilled"]
                curve["checkpoints"].append({"step": step, "heldout_kl": measured})
                postfix["heldout_kl"] = f"{measured:.4f}"
                if checkpoint_path is not None and step > 0:
                    save_checkpoint(checkpoint_path, identity, trainable, optimizer, curve)
            started = time.time()
            batch = Batch([train[i] for i in batches[step]], pad_id, device)
            teacher = teacher_forward(peft_model, steerer, batch, hidden)
            student = forward(peft_model, batch, hidden)
            kl = position_kl(teacher.logits, student.logits).mean()
            error = hidden_error(teacher.hidden_states, student.hidden_states, batch.positions, hidden_layers) if hidden else None
            loss = kl + hidden_weight * error if hidden else kl
            if not torch.isfinite(loss):
                raise PersonaLoRAError(f"the distillation loss became {loss.item()} at step {step}; lower --learning_rate")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable.values(), 1.0)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate * learning_rate_factor(step, steps)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            curve["losses"].append(loss.item())
            curve["kl"].append(kl.item())
            curve["hidden_error"].append(error.item() if hidden else None)
            curve["training_seconds"] += time.time() - started
            postfix["loss"] = f"{loss.item():.4f}"
            bar.set_postfix(postfix)
            bar.update(1)
    return curve


def save_checkpoint(path: Path, identity: str | None, trainable: dict, optimizer, curve: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save({"identity": identity, "adapter": {name: p.detach().cpu() for name, p in trainable.items()},
                    "optimizer": optimizer.state_dict(), "curve": curve}, tmp)


# ---------------------------------------------------------------------------------------------
# What the update is: norms, residual writes, cosines
# ---------------------------------------------------------------------------------------------


def update_report(diff: lu.PersonaLoRADiff, vector_at_layer: torch.Tensor) -> dict:
    """‖ΔW‖_F in total, per layer × module type and per module type; and, for the modules that
    write into the residual stream (output size = hidden size), the fraction of v[ℓ]'s energy that
    lies in the update's output space (chance: rank / hidden size), weighted by module norm."""
    by_layer: dict[int, dict[str, float]] = {}
    by_type: dict[str, float] = {}
    writes, weighted, weights = {}, 0.0, 0.0
    direction = (vector_at_layer / vector_at_layer.norm()).double()
    for name in diff:
        norm, kind = diff.module_norm(name), lu.module_type(name)
        by_layer.setdefault(lu.layer_index(name), {})[kind] = norm
        by_type[kind] = math.sqrt(by_type.get(kind, 0.0) ** 2 + norm**2)
        if diff.shape(name)[0] == direction.numel() and norm > 0:
            u, singular, _ = diff.svd(name)
            basis = u[:, singular > 1e-6 * singular[0]]
            writes[name] = float((basis.T @ direction).pow(2).sum())
            weighted, weights = weighted + norm * writes[name], weights + norm
    return {"norm": diff.norm(), "norm_by_layer_and_type": dict(sorted(by_layer.items())), "norm_by_type": by_type,
            "v_energy_in_output_space": {"by_module": writes, "norm_weighted_mean": weighted / weights if weights else None,
                                         "chance": None if not writes else diff.rank(next(iter(writes))) / direction.numel()}}


def comparisons(diff: lu.PersonaLoRADiff, persona_diff_path: str | None, control_paths: list[str],
                loaded: dict[str, lu.PersonaLoRADiff] | None = None) -> dict:
    """Weight-space cosine of the distilled update with the persona diff and each control diff:
    over the whole weight space, and within the modules the update touches (where it can agree)."""
    loaded = loaded or {}

    def cosines(path: str) -> dict:
        other = loaded[path] if path in loaded else lu.load_lora_diff(path)
        shared = lu.PersonaLoRADiff({name: other.factors[name] for name in diff if name in other})
        return {"path": str(path), "trait": other.metadata.get("trait"), "cosine": diff.cosine(other),
                "cosine_within_distilled_modules": diff.cosine(shared) if len(shared) else None}

    return {"persona_diff": cosines(persona_diff_path) if persona_diff_path else None,
            "controls": [cosines(path) for path in control_paths]}


def functional_report(model, tokenizer, steerer, diff: lu.PersonaLoRADiff, persona_diff: lu.PersonaLoRADiff | None,
                      heldout: list, layer: int, batch_size: int, controls: dict[str, lu.PersonaLoRADiff] | None = None) -> dict:
    """The distilled update (merged at 1), the teacher's steering and the persona diff (merged at 1)
    compared by the residual-stream change each causes at the steered layer on the held-out answers'
    tokens (eval.activations.functional_comparison), on the plain `model`: do they do the same thing
    there, whatever their weight-space cosine? Each control diff (another trait's, merged at 1) is
    compared alike: the null for those cosines (how much any persona diff's change lines up with the
    steering's)."""
    edits = {"distilled": lambda: lu.LoRASteerer(model, diff, 1.0), "steering": lambda: steerer}
    if persona_diff is not None:
        edits["persona diff"] = lambda: lu.LoRASteerer(model, persona_diff, 1.0)
    for label, control in (controls or {}).items():
        edits[f"control {label}"] = (lambda d: lambda: lu.LoRASteerer(model, d, 1.0))(control)
    return {"layer": layer, "coefficients": "distilled and persona diff merged at 1, the steering at its --coef",
            "tokens": "the held-out teacher answers' own tokens", "pairs": functional_comparison(
                model, heldout, tokenizer.pad_token_id, layer, edits, batch_size)}


def control_diffs(args, inputs: dict) -> dict[str, lu.PersonaLoRADiff]:
    """The control diffs by label (their trait, else their file's name)."""
    return {control_label(path, inputs["comparisons"][path]): inputs["comparisons"][path] for path in args.control_diff_paths}


def control_label(path: str, diff: lu.PersonaLoRADiff) -> str:
    return str(diff.metadata.get("trait") or Path(path).stem)


def controls_compared(functional: dict, control_paths: list[str], inputs: dict) -> bool:
    """Whether a stored functional comparison already holds every control's pairs."""
    return all(f"steering vs control {control_label(path, inputs['comparisons'][path])}" in functional.get("pairs", {})
               for path in control_paths)


def run_identity(args, teacher: dict, layers: list[int]) -> dict:
    """Everything the distilled update and its curve depend on (the comparisons are not)."""
    return {"teacher": teacher, "rank": args.rank, "target_modules": sorted(args.target_modules), "layers": layers,
            **{key: getattr(args, key) for key in ("steps", "learning_rate", "batch_size", "hidden_weight", "eval_every",
                                                   "heldout_fraction", "max_length")}}


def print_summary(summary: dict) -> None:
    print(f"\n== distilling {summary['trait']} steering (layer {summary['layer']}, coef {summary['coef']:g}) into a rank-"
          f"{summary['rank']} LoRA on {', '.join(summary['target_modules'])} of layers {summary['layers_spec']} ==")
    print(f"held-out KL(steered ‖ plain)     {summary['heldout_kl_plain']:.5f} nats/token")
    print(f"held-out KL(steered ‖ distilled) {summary['heldout_kl_distilled']:.5f} nats/token  (ratio {summary['ratio']:.3f}, "
          f"fraction reproduced {summary['fraction_reproduced']:.3f} ± {summary['fraction_reproduced_error']['sem']:.3f}; "
          f"{summary['heldout']['answers']} held-out answers, "
          f"{summary['heldout']['tokens']} positions)")
    print("held-out KL by step: " + ", ".join(f"{c['step']}: {c['heldout_kl']:.4f}" for c in summary["curve"]["checkpoints"]))
    update = summary["update"]
    writes = update["v_energy_in_output_space"]
    print(f"‖ΔW‖_F = {update['norm']:.4f}" + (f"; v's energy in its residual writes {writes['norm_weighted_mean']:.3f} "
                                              f"(chance {writes['chance']:.4f})" if writes["norm_weighted_mean"] is not None else ""))
    persona = summary["comparisons"]["persona_diff"]
    for entry in ([persona] if persona else []) + summary["comparisons"]["controls"]:
        within = entry["cosine_within_distilled_modules"]
        print(f"cosine with {entry['trait'] or entry['path']} diff: {entry['cosine']:+.4f}"
              + (f" (within the distilled modules {within:+.4f})" if within is not None else ""))
    functional = summary.get("functional")
    if functional:
        print(f"what they do at layer {functional['layer']} on the held-out answers ({functional['coefficients']}):")
        for pair, c in functional["pairs"].items():
            print(f"  {pair:28s} mean change cosine {c['mean_change_cosine']:+.3f}, norm ratio {c['mean_change_norm_ratio']:.3f}; "
                  f"per-token cosine {c['per_token_cosine_mean']:+.3f} ({c['tokens']} tokens)")


def main():
    args = parse_args()
    started = time.time()
    inputs = check_inputs(args)
    trait, layers = inputs["trait"], inputs["layers"]
    dtype = resolve_dtype(args.dtype)
    output_dir = Path(args.output_dir)
    diff_path = output_dir / f"{args.trait}_distilled_lora_diff.pt"
    teacher = teacher_identity(args, trait, dtype)
    identity = run_identity(args, teacher, layers)
    identity_hash = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    with OutputLock(output_dir, "--output_dir"):
        remove_stale_temporaries(output_dir)
        summary_path = output_dir / "summary.json"
        previous = read_json_object(summary_path, "summary") if summary_path.is_file() else None
        if previous is not None and previous.get("identity") == identity and diff_path.is_file():
            print(f"{output_dir} holds an update distilled with these settings: reused (delete it to train again)")
            diff = lu.load_lora_diff(diff_path)
            summary = {**previous, "comparisons": comparisons(diff, args.persona_diff_path, args.control_diff_paths, inputs["comparisons"])}
            if summary.get("functional") is None or not controls_compared(summary["functional"], args.control_diff_paths, inputs):
                # a run made before the functional comparison (or its controls) existed
                model, tokenizer = load_model_and_tokenizer(args.model, dtype=dtype)
                steerer = ActivationSteerer(model, inputs["vector"], args.layer, args.coef, positions=args.steering_type)
                records = teacher_answers(args, trait, model, tokenizer, steerer, teacher)
                _, heldout, _ = split_spans(tokenizer, records, inputs["heldout_from"], args.max_length)
                summary["functional"] = functional_report(model, tokenizer, steerer, diff, inputs["comparisons"].get(args.persona_diff_path),
                                                          heldout, args.layer, args.batch_size, control_diffs(args, inputs))
        else:
            summary = train_and_measure(args, inputs, dtype, teacher, identity, identity_hash, diff_path, started)
        write_json(summary_path, summary)
        write_manifest(output_dir, args, started, outputs={"diff": str(diff_path), "summary": str(summary_path)},
                       seconds_by_phase=summary["seconds"])
    print_summary(summary)
    print(f"\nwrote {diff_path} and {summary_path} in {time.time() - started:.0f} s")


def train_and_measure(args, inputs: dict, dtype, teacher: dict, identity: dict, identity_hash: str, diff_path: Path,
                      started: float) -> dict:
    trait, vector, layers = inputs["trait"], inputs["vector"], inputs["layers"]
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=dtype)
    steerer = ActivationSteerer(model, vector, args.layer, args.coef, positions=args.steering_type)
    generation_started = time.time()
    records = teacher_answers(args, trait, model, tokenizer, steerer, teacher)
    generation_seconds = time.time() - generation_started
    train, heldout, heldout_questions = split_spans(tokenizer, records, inputs["heldout_from"], args.max_length)
    adapter_init_seed = init_seed("distill", args.seed)
    module_names = lora_module_names(model, args.target_modules, layers)
    peft_model = attach_lora(model, module_names, args.rank, adapter_init_seed)
    checkpoint_path = Path(args.output_dir) / CHECKPOINT
    curve = distill(peft_model, steerer, train, heldout, pad_id=tokenizer.pad_token_id, steps=args.steps,
                    learning_rate=args.learning_rate, batch_size=args.batch_size, seed=args.seed, eval_every=args.eval_every,
                    hidden_weight=args.hidden_weight, hidden_layers=list(range(args.layer + 1, inputs["num_layers"])),
                    checkpoint_path=checkpoint_path, identity=identity_hash)
    evaluation_started = time.time()
    final = heldout_kl(peft_model, steerer, heldout, tokenizer.pad_token_id, args.batch_size, plain=True)
    curve["checkpoints"].append({"step": args.steps, "heldout_kl": final["distilled"]})
    evaluation_seconds = time.time() - evaluation_started
    objective = "KL(steered ‖ student) of the next-token distributions at the answer positions" + (
        f" + {args.hidden_weight:g} × normalised squared error of hidden_states[{args.layer + 1}..{inputs['num_layers'] - 1}]"
        if args.hidden_weight > 0 else "")
    diff = lu.peft_model_update(peft_model)
    diff.metadata = {"trait": args.trait, "base_model": model_label(args.model), "created_by": "distill_steering_lora.py",
                     "provenance": "a LoRA distilled from activation steering", "vector_path": args.vector_path,
                     "layer": args.layer, "coef": args.coef, "steering_type": args.steering_type, "rank": args.rank,
                     "target_modules": sorted(args.target_modules), "layers": layers, "objective": objective, "seed": args.seed,
                     "init": {"seed": adapter_init_seed, "rank": args.rank, "target_modules": sorted(args.target_modules),
                              "stream": "distill"}}
    diff.save(diff_path)
    model = peft_model.unload()  # the plain model again: the update is compared merged, like the persona diff
    functional = functional_report(model, tokenizer, steerer, diff, inputs["comparisons"].get(args.persona_diff_path), heldout,
                                   args.layer, args.batch_size, control_diffs(args, inputs))
    ratio = final["distilled"] / final["plain"]
    held_counts = ", ".join(f"{inputs['counts'][name] - start} {name}" for name, start in inputs["heldout_from"].items())
    summary = {
        "trait": args.trait, "model": model_label(args.model), "layer": args.layer, "coef": args.coef,
        "steering_type": args.steering_type, "rank": args.rank, "target_modules": args.target_modules,
        "layers_spec": " ".join(args.layers), "layers": layers, "objective": objective,
        "heldout_kl_plain": final["plain"], "heldout_kl_distilled": final["distilled"], "ratio": ratio,
        "fraction_reproduced": 1.0 - ratio, "fraction_reproduced_error": fraction_interval(final["per_answer"], heldout_questions),
        "heldout": {"answers": len(heldout), "tokens": final["tokens"], "training_answers": len(train),
                    "questions": f"the last {args.heldout_fraction:g} of the trait's extraction and finetuning questions "
                                 f"({held_counts}), never trained on; the evaluation questions are not used"},
        "curve": curve, "update": update_report(diff, vector[args.layer]),
        "comparisons": comparisons(diff, args.persona_diff_path, args.control_diff_paths, inputs["comparisons"]),
        "functional": functional,
        "seconds": {"generation": round(generation_seconds, 2), "training": round(curve["training_seconds"], 2),
                    "final_evaluation": round(evaluation_seconds, 2), "total": round(time.time() - started, 2)},
        "init_seed": adapter_init_seed, "modules": len(module_names), "identity": identity,
    }
    checkpoint_path.unlink(missing_ok=True)  # the diff and the summary now hold everything it did
    return summary


if __name__ == "__main__":
    run_cli(main)
