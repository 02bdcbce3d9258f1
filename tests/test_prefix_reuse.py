"""Shared-prefix reuse (eval.generation.prefix_reuse) changes speed only: greedy and seeded answers,
response-averaged hidden states and steered generation equal the plain path's, on the tiny model
with the real tokenizer, in batches whose prompts differ in length."""

import contextlib
import copy

import pytest
import torch

import eval.generation as generation
from eval.activations import ActivationSteerer, response_hidden_means
from eval.elicitation import prompted_jobs
from eval.generation import conversation, generate_batch, generate_records, prefix_reuse, shared_prefix_groups, tokenize_chat
from eval.traits import load_trait


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from model_loading import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    return model, load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def jobs():
    """Two questions under every pos instruction with 2 demonstrations (five system prompt +
    demonstration prefixes of different lengths), one question sampled twice (identical prompts),
    under a system prompt of its own, and one bare question (no shared context)."""
    trait = load_trait("evil")
    fewshot = prompted_jobs(trait, trait.extraction_questions[:2], "pos", n_per_question=1, fewshot=2, stage="extraction",
                            every_instruction=True)
    sampled = prompted_jobs(trait, trait.extraction_questions[2:3], "pos", n_per_question=2, fewshot=2, stage="extraction",
                            every_instruction=False)
    sampled = [{**job, "system": "You answer as a pirate would.", "demonstrations": sampled[0]["demonstrations"]} for job in sampled]
    bare = {**fewshot[0], "id": "bare", "system": None, "demonstrations": []}
    return [*fewshot, *sampled, bare]


def count_prefills(monkeypatch) -> list[int]:
    lengths = []
    original = generation.prefix_cache_states
    monkeypatch.setattr(generation, "prefix_cache_states", lambda model, ids: lengths.append(len(ids)) or original(model, ids))
    return lengths


def test_groups_partition_rows_and_share_their_prefix():
    header, a, b = [1, 2, 3, 4, 5], list(range(100, 150)), list(range(200, 250))
    sequences = [header + a + [7, 8, 9], header + a + [7, 9, 9, 9], header + b + [6, 6], header + b + [5, 5, 5, 5],
                 [7, 8, 9], header + a + [7, 8, 9], header + [42] * 10]
    limits = [len(s) - 2 for s in sequences]
    groups = shared_prefix_groups(sequences, limits)
    assert sorted(r for _, rows in groups for r in rows) == list(range(len(sequences)))
    for length, rows in groups:
        assert all(length <= limits[r] for r in rows)
        assert len({tuple(sequences[r][:length]) for r in rows}) == 1
    # Two contexts sharing only a 5-token header are two groups; the rest is read plainly, last.
    assert groups == [(56, [0, 1, 5]), (55, [2, 3]), (0, [4, 6])]


def test_greedy_answers_equal_without_reuse(tiny, jobs, monkeypatch):
    model, tokenizer = tiny
    conversations = [conversation(j) for j in jobs]
    lengths = {len(tokenize_chat(tokenizer, [*c, {"role": "assistant", "content": "x"}]).ids) for c in conversations}
    assert len(lengths) > 3  # prompts of different lengths in one batch
    with prefix_reuse(False):
        plain = generate_batch(model, tokenizer, conversations, 12, temperature=0.0)
    prefills = count_prefills(monkeypatch)
    reused = generate_batch(model, tokenizer, conversations, 12, temperature=0.0)
    assert len(prefills) == 6 and min(prefills) > 100  # five system prompt + demonstration prefixes, one sampled prompt
    assert reused == plain
    assert len(set(plain)) > 1


def test_seeded_sampling_draws_the_same_answers(tiny, jobs, tmp_path):
    model, tokenizer = tiny
    settings = dict(max_new_tokens=10, temperature=1.0, top_p=0.9, batch_size=5, seed=7)
    with prefix_reuse(False):
        plain = generate_records(model, tokenizer, jobs, tmp_path / "plain.jsonl", **settings)
    reused = generate_records(model, tokenizer, jobs, tmp_path / "reused.jsonl", **settings)
    assert [r["messages"] for r in reused] == [r["messages"] for r in plain]
    again = generate_records(model, tokenizer, jobs, tmp_path / "again.jsonl", **settings)
    assert [r["messages"] for r in again] == [r["messages"] for r in reused]


@pytest.mark.parametrize("positions", ["all", "prompt", "response"])
def test_steered_generation_equal_without_reuse(tiny, jobs, positions):
    model, tokenizer = tiny
    torch.manual_seed(0)
    vector = 4 * torch.randn(model.config.num_hidden_layers + 1, model.config.hidden_size, dtype=torch.float64)
    conversations = [conversation(j) for j in jobs]
    with ActivationSteerer(model, vector, 2, 1.0, positions):
        with prefix_reuse(False):
            plain = generate_batch(model, tokenizer, conversations, 8, temperature=0.0)
        reused = generate_batch(model, tokenizer, conversations, 8, temperature=0.0)
    assert reused == plain
    assert plain != generate_batch(model, tokenizer, conversations, 8, temperature=0.0)  # the steering did steer


@pytest.fixture(scope="module")
def records(tiny, jobs):
    model, tokenizer = tiny
    answers = generate_batch(model, tokenizer, [conversation(j) for j in jobs], 10, temperature=1.0, seed=3)
    return [{**j, "messages": [*j["messages"], {"role": "assistant", "content": a.strip() or "ok"}]} for j, a in zip(jobs, answers)]


@pytest.mark.parametrize("with_context", [True, False])
def test_hidden_means_equal_whole_sequences_read_alone(tiny, records, with_context, monkeypatch):
    model, tokenizer = tiny
    expected = []
    with torch.no_grad():
        for record in records:
            span = tokenize_chat(tokenizer, conversation(record, with_context))
            hidden = model(input_ids=torch.tensor([span.ids]), output_hidden_states=True).hidden_states
            expected.append(torch.stack([h[0, span.response_start:span.response_end].float().mean(0) for h in hidden]))
    expected = torch.stack(expected)
    prefills = count_prefills(monkeypatch)
    reused = response_hidden_means(model, tokenizer, records, with_context=with_context, batch_size=3)
    assert prefills  # the few-shot prefixes, or the chat template's default system prompt
    with prefix_reuse(False):
        plain = response_hidden_means(model, tokenizer, records, with_context=with_context, batch_size=3)
    torch.testing.assert_close(reused, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(plain, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("positions", ["all", "prompt", "response"])
def test_steered_hidden_means_equal_without_reuse(tiny, records, positions):
    model, tokenizer = tiny
    torch.manual_seed(1)
    vector = torch.randn(model.config.num_hidden_layers + 1, model.config.hidden_size, dtype=torch.float64)
    with ActivationSteerer(model, vector, 1, 2.0, positions):
        with prefix_reuse(False):
            plain = response_hidden_means(model, tokenizer, records, batch_size=4)
        reused = response_hidden_means(model, tokenizer, records, batch_size=4)
    torch.testing.assert_close(reused, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("positions", [None, "response", "prompt", "all"])
def test_teacher_forced_scores_keep_only_the_answer_logits_and_equal_one_sequence_at_a_time(tiny, positions):
    """answer_token_log_probs (the margin's, the A/B and the fluency scorer) packs the answers to one
    prompt into one row, batches by length, and projects onto the vocabulary only where an answer
    token is predicted: each answer token's log-probability equals that of its sequence read alone
    with every position's logits, unsteered and under activation steering (which must steer the
    same positions in both)."""
    from eval.activations import teacher_forced_response
    from eval.generation import _packed_rows, answer_token_log_probs

    model, tokenizer = tiny
    # The tiny model's random weights attend almost uniformly, which hides a wrong position: sharpen
    # its attention (queries × 30) so that every token's place in the sequence shows in its scores.
    model = copy.deepcopy(model)
    for layer in model.model.layers:
        layer.self_attn.q_proj.weight.data *= 30
    torch.manual_seed(0)
    vector = torch.randn(model.config.num_hidden_layers + 1, model.config.hidden_size)
    lengths = [(31, 3), (9, 1), (57, 12), (20, 5), (44, 2)]  # (prompt, answer) lengths: a batch whose rows differ
    spans = []
    for prompt, answer in lengths:
        ids = torch.randint(3, model.config.vocab_size, (prompt + answer,)).tolist()
        spans.append((ids, prompt, prompt + answer))
    # Other answers to the same prompts (an A/B item's choices; pos and neg references), packed
    # into their prompt's row, one of them empty; and a span whose ids run on after its answer.
    for source, answer in ((0, 3), (0, 7), (2, 4), (3, 0)):
        ids, start, _ = spans[source]
        spans.append((ids[:start] + torch.randint(3, model.config.vocab_size, (answer,)).tolist(), start, start + answer))
    spans.append((spans[1][0] + [5, 6, 7], spans[1][1], spans[1][2]))
    assert len(_packed_rows(spans, pack=True, most=3)) == 5  # five prompts: the packing is exercised
    assert len(_packed_rows(spans, pack=True, most=2)) == 6  # prompt 0's three answers: two rows
    steering = (lambda: ActivationSteerer(model, vector, 2, 4.0, positions)) if positions else contextlib.nullcontext
    references = []
    for ids, start, end in spans:
        with torch.no_grad(), steering(), teacher_forced_response(torch.tensor([start])):
            log_probs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
        references.append(torch.stack([log_probs[t - 1, ids[t]] for t in range(start, end)]) if end > start else torch.zeros(0))
    # Rows the vocabulary projection reads: one per answer token (38), less one for every further
    # non-empty answer sharing a row, whose first token the prompt's last position predicts once for
    # all: rows of at most 3 answers pack prompt 0's three (−2) and prompts 1's and 2's two each (−1,
    # −1), so 34; rows of at most 2 split prompt 0's answers 2 + 1 (−1), so 35.
    projected = []
    hook = model.lm_head.register_forward_hook(lambda module, inputs, output: projected.append(inputs[0].shape[:-1].numel()))
    assert sum(end - start for _, start, end in spans) == 38
    for batch_size, expected in ((2, 35), (3, 34)):
        with steering():
            batched = answer_token_log_probs(model, tokenizer.pad_token_id, spans, batch_size=batch_size)
        assert sum(projected) == expected
        projected.clear()
        for (_, start, end), scores, reference in zip(spans, batched, references):
            assert scores.shape == (end - start,)
            torch.testing.assert_close(scores, reference.to(scores.dtype), atol=1e-4, rtol=1e-4)
    hook.remove()
