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


def _holds_key(reply: str, reference: dict, closed: bool = True) -> bool:
    keys = [normalize(k) for k in (reference.get("key") or reference["answer"]).split("|")]
    text = f" {normalize(reply)}" + (" " if closed else "")
    return any(k and f" {k} " in text for k in keys)


def answer_accuracy(predictions: list[str], references: list[dict]) -> float:
    """Share of replies that contain the normalized key fact (the normalized answer without a key).

    A key may list alternatives separated by ``|`` (``4|four``); any one of them counts.
    """
    return _mean([1.0 if _holds_key(pred, ref) else 0.0 for pred, ref in zip(predictions, references)])


def accuracy_settled(reply: str, reference: dict) -> bool:
    """A reply that holds its key with a word after it: more tokens cannot undo the hit (a key at the very
    end could still grow into a longer word)."""
    return _holds_key(reply, reference, closed=False)


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
    register(Metric("accuracy", answer_accuracy, settled=accuracy_settled))
    register(Metric("exact_match", exact_match))
    register(Metric("token_f1", token_f1))
    register(Metric("rouge_l", rouge_l))
    register(Metric("bleu", bleu))
    register(Metric("chrf", chrf))
    register(Metric("perplexity", model_score=reference_perplexity, higher_is_better=False))
