"""Example plugin: ``length_ratio``, reply length over reference length (1.0 = same length)."""

from agentpeft.hookspecs import hookimpl
from agentpeft.pipeline.evaluate import Metric


def length_ratio(predictions: list[str], references: list[dict]) -> float:
    """Mean of len(reply words) / len(reference words): how verbose the model is."""
    ratios = [len(p.split()) / max(len(r["answer"].split()), 1) for p, r in zip(predictions, references)]
    return sum(ratios) / len(ratios) if ratios else 0.0


@hookimpl
def register_metrics(register):
    register(Metric("length_ratio", length_ratio, higher_is_better=False))
