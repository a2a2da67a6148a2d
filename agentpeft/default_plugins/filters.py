"""Built-in pair filters: PII redaction, exact and near-duplicate removal, token-length bounds."""

from __future__ import annotations

import re
from collections import Counter

from ..hookspecs import hookimpl
from ..pii import redact, replace_known
from ..pipeline.dataset import Filter, Pair, context_window, count_tokens, note, stage_tokenizer

NUM_PERM = 128


def pii_filter(pairs: list[Pair], recipe) -> list[Pair]:
    """Replace e-mail addresses, phone, card, national-ID and medical-record numbers with typed placeholders."""
    totals: Counter = Counter()
    for pair in pairs:
        found: dict[str, str] = {}
        question, answer = redact(pair.question), redact(pair.answer)
        totals.update(question.counts)
        totals.update(answer.counts)
        found.update(question.found)
        found.update(answer.found)
        # The key and the paraphrases are cut from the same text: a value found there is PII here too.
        rest = [redact(t) for t in (pair.key or "", *pair.paraphrases)]
        for r in rest:
            found.update(r.found)
        pair.question = replace_known(question.text, found)
        pair.answer = replace_known(answer.text, found)
        if pair.key:
            pair.key = replace_known(rest[0].text, found)
        pair.paraphrases = [replace_known(r.text, found) for r in rest[1:]]
    note("redactions", dict(sorted(totals.items())))
    return pairs


def _words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def dedup_filter(pairs: list[Pair], recipe) -> list[Pair]:
    """Drop exact duplicates (same normalized question) and near-duplicates, keeping the first.

    A pair is a near-duplicate of a kept one when MinHash LSH (datasketch) over the words of its
    question and answer estimates their Jaccard similarity at ``data.dedup_threshold`` or more, and
    both state the same figures: pairs that differ in a number (a price, a model code) hold different
    facts and are both kept.
    """
    from datasketch import MinHash, MinHashLSH

    threshold = recipe.data.dedup_threshold
    exact, unique = set(), []
    for pair in pairs:
        key = " ".join(_words(pair.question))
        if key not in exact:
            exact.add(key)
            unique.append(pair)
    if threshold >= 1 or len(unique) < 2:
        return unique
    words = [set(_words(f"{p.question} {p.answer}")) or {""} for p in unique]
    hashes = MinHash.bulk([[w.encode() for w in ws] for ws in words], num_perm=NUM_PERM)
    figures = [frozenset(w for w in ws if any(c.isdigit() for c in w)) for ws in words]
    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    kept = []
    for i, pair in enumerate(unique):
        if not any(figures[j] == figures[i] and hashes[j].jaccard(hashes[i]) >= threshold
                   for j in lsh.query(hashes[i])):
            lsh.insert(i, hashes[i])
            kept.append(pair)
    note("near_duplicates_removed", len(unique) - len(kept))
    return kept


MIN_QUESTION_TOKENS = 2
MIN_ANSWER_TOKENS = 1


def length_filter(pairs: list[Pair], recipe) -> list[Pair]:
    """Keep pairs whose rendered conversation fits the smaller of max_seq_len and the model's context window."""
    tokenizer = stage_tokenizer(recipe)
    limit = min(recipe.train.max_seq_len, context_window(tokenizer))
    kept, short, long_ = [], 0, 0
    for pair in pairs:
        n_q = len(tokenizer(pair.question.strip(), add_special_tokens=False)["input_ids"])
        n_a = len(tokenizer(pair.answer.strip(), add_special_tokens=False)["input_ids"])
        if n_q < MIN_QUESTION_TOKENS or n_a < MIN_ANSWER_TOKENS:
            short += 1
        elif count_tokens(tokenizer, recipe.system_prompt, pair.question, pair.answer)[1] > limit:
            long_ += 1
        else:
            kept.append(pair)
    note("length", {"limit_tokens": limit, "too_short": short, "too_long": long_})
    return kept


@hookimpl
def register_filters(register):
    register(Filter("pii", pii_filter))
    register(Filter("dedup", dedup_filter))
    register(Filter("length", length_filter))
