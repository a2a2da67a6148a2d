"""Example plugin: ``length_ratio``, reply length over reference length (1.0 = same length)."""

from agentpeft import Metric, hookimpl


def length_ratio(predictions: list[str], references: list[dict]) -> float:
    """Mean of len(reply words) / len(reference words): how verbose the model is."""
    ratios = [len(p.split()) / max(len(r["answer"].split()), 1) for p, r in zip(predictions, references)]
    return sum(ratios) / len(ratios) if ratios else 0.0


@hookimpl
def register_metrics(register) -> None:
    """Register the length_ratio metric (lower is better: 1.0 is the reference's length)."""
    register(Metric("length_ratio", length_ratio, higher_is_better=False))
