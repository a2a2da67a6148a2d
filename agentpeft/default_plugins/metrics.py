"""Built-in metrics: answer accuracy, exact match, token F1, ROUGE-L, BLEU, chrF and perplexity."""

from __future__ import annotations

import re
import string
from collections import Counter

from ..hookspecs import hookimpl
from ..pipeline.evaluate import Metric, reference_perplexity


def normalize(text: str) -> str:
    """SQuAD-style normalization: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(" " if ch in string.punctuation else ch for ch in text)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def answer_accuracy(predictions: list[str], references: list[dict]) -> float:
    """Share of replies that contain the normalized key fact (the normalized answer without a key).

    A key may list alternatives separated by ``|`` (``4|four``); any one of them counts.
    """
    hits = []
    for pred, ref in zip(predictions, references):
        keys = [normalize(k) for k in (ref.get("key") or ref["answer"]).split("|")]
        reply = f" {normalize(pred)} "
        hits.append(1.0 if any(k and f" {k} " in reply for k in keys) else 0.0)
    return _mean(hits)


def exact_match(predictions: list[str], references: list[dict]) -> float:
    """Share of replies equal to the reference answer after normalization."""
    return _mean([float(normalize(p) == normalize(r["answer"])) for p, r in zip(predictions, references)])


def token_f1(predictions: list[str], references: list[dict]) -> float:
    """Mean SQuAD token F1 between reply and reference answer."""
    scores = []
    for pred, ref in zip(predictions, references):
        p, r = normalize(pred).split(), normalize(ref["answer"]).split()
        common = sum((Counter(p) & Counter(r)).values())
        scores.append(0.0 if not common else 2 * common / (len(p) + len(r)))
    return _mean(scores)


def rouge_l(predictions: list[str], references: list[dict]) -> float:
    """Mean ROUGE-L F-measure against the reference answer (the ``rouge-score`` package)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return _mean([scorer.score(r["answer"], p)["rougeL"].fmeasure for p, r in zip(predictions, references)])


def bleu(predictions: list[str], references: list[dict]) -> float:
    """Corpus BLEU (sacrebleu), scaled to [0, 1]."""
    import sacrebleu

    return sacrebleu.corpus_bleu(predictions, [[r["answer"] for r in references]]).score / 100


def chrf(predictions: list[str], references: list[dict]) -> float:
    """Corpus chrF (sacrebleu), scaled to [0, 1]."""
    import sacrebleu

    return sacrebleu.corpus_chrf(predictions, [[r["answer"] for r in references]]).score / 100


@hookimpl
def register_metrics(register):
    register(Metric("accuracy", answer_accuracy))
    register(Metric("exact_match", exact_match))
    register(Metric("token_f1", token_f1))
    register(Metric("rouge_l", rouge_l))
    register(Metric("bleu", bleu))
    register(Metric("chrf", chrf))
    register(Metric("perplexity", model_score=reference_perplexity, higher_is_better=False))
