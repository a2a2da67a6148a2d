"""Instruction pairs, the generators and filters that make and keep them, and what a running dataset
stage shares with them (its tokenizer, its teacher, the figures for the dataset card).

A module of its own, below the dataset stage, so that the teacher and the plugins can use these
without importing the stage.
"""

from __future__ import annotations

import contextvars
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable

if TYPE_CHECKING:
    from .recipe import Recipe


@dataclass
class Pair:
    """One fact as a question/answer pair; ``key`` is the short fact the answer must contain."""

    question: str
    answer: str
    key: str | None = None
    source: str = ""
    generator: str = ""
    #: Other phrasings of the question that the generator knows (they keep the meaning exactly).
    paraphrases: list[str] = field(default_factory=list)
    #: False for train-only pairs (the general mix): trained as they are, never held out.
    held_out: bool = True
    #: False: trained as a plain chat, without the recipe's system prompt.
    system: bool = True


@dataclass(frozen=True)
class Generator:
    """Turns Documents into Pairs: ``generate(documents)`` or ``generate(documents, recipe)``."""

    name: str
    generate: Callable[..., Iterable[Pair]]


@dataclass(frozen=True)
class Filter:
    """Keeps, drops or rewrites pairs: ``apply(pairs, recipe) -> pairs``."""

    name: str
    apply: Callable[[list[Pair], "Recipe"], list[Pair]]


# --- what a running stage shares with its generators and filters -------------------------------

@dataclass
class _Stage:
    tokenizer: Any = None
    teacher: Any = None
    notes: dict = field(default_factory=dict)


_stage: contextvars.ContextVar[_Stage | None] = contextvars.ContextVar("agentpeft_dataset_stage", default=None)


def note(key: str, value: Any) -> None:
    """Record a figure for the dataset card (a filter's redaction counts, the teacher's drop counts)."""
    stage = _stage.get()
    if stage is not None:
        stage.notes[key] = value


def stage_tokenizer(recipe: "Recipe") -> Any:
    """The base model's tokenizer: the running stage's, else loaded from ``recipe.base_model``."""
    stage = _stage.get()
    if stage is not None and stage.tokenizer is not None:
        return stage.tokenizer
    from .models import load_tokenizer, resolve_base

    return load_tokenizer(resolve_base(recipe.base_model))


_FIGURE = re.compile(
    r"[$€£]?\d[\d,.:/-]*\d(?:\s?(?:%|(?:years?|months?|weeks?|days?|hours?|minutes?|seconds?|kg|g|lb|cm|mm|m|"
    r"W|V|lumens|lm|K|GB|MB|mAh)\b))?|[$€£]?\d(?:\s?(?:%|(?:years?|months?|weeks?|days?|hours?|minutes?|"
    r"seconds?|kg|g|lb|cm|mm|m|W|V|lumens|lm|K|GB|MB)\b))?"
)


def key_fact(text: str, fallback_words: int = 6) -> str:
    """The salient short fact of an answer: its first figure (price, date, quantity), else its first words."""
    match = _FIGURE.search(text)
    if match:
        return match.group(0).rstrip(".,")
    words = text.split()[:fallback_words]
    return " ".join(words).rstrip(".,;:!?")
