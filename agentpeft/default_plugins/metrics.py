"""Built-in metrics: answer accuracy (the key fact appears in the reply) and ROUGE-L."""

from __future__ import annotations

import re
import string

from ..hookspecs import hookimpl
from ..pipeline.evaluate import Metric


def normalize(text: str) -> str:
    """SQuAD-style normalization: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(" " if ch in string.punctuation else ch for ch in text)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def answer_accuracy(predictions: list[str], references: list[dict]) -> list[float]:
    """1.0 where the normalized key fact occurs in the normalized reply."""
    scores = []
    for pred, ref in zip(predictions, references):
        key = normalize(ref.get("key") or ref["answer"])
        scores.append(1.0 if key and f" {key} " in f" {normalize(pred)} " else 0.0)
    return scores


def rouge_l(predictions: list[str], references: list[dict]) -> list[float]:
    """ROUGE-L F-measure against the reference answer (the ``rouge-score`` package)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(ref["answer"], pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]


@hookimpl
def register_metrics(register):
    register(Metric("accuracy", answer_accuracy))
    register(Metric("rouge_l", rouge_l))
