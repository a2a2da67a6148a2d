"""Built-in pair filters: PII redaction, duplicate removal, token-length bounds."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import replace

from ..hookspecs import hookimpl
from ..pii import redact, replace_known
from ..pipeline.dataset import Filter, Pair, context_window, count_tokens, note, stage_tokenizer

NUM_PERM = 128
#: Examples of dropped pairs the dataset card shows per reason.
EXAMPLES = 3


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


class _Drops:
    """What a filter dropped: counts by reason and the first few examples of each."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.examples: list[dict] = []

    def add(self, reason: str, pair: Pair, n: int = 1, **detail) -> None:
        self.counts[reason] += n
        if sum(1 for e in self.examples if e["reason"] == reason) < EXAMPLES:
            self.examples.append({"reason": reason, "question": pair.question, "source": pair.source, **detail})


# --- dedup ----------------------------------------------------------------------------------------

SAME_ANSWER = "same question, near-identical answer"
NEAR_PAIR = "near-identical question and answer"


def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def _figures(words) -> frozenset[str]:
    return frozenset(w for w in words if any(c.isdigit() for c in w))


def dedup_filter(pairs: list[Pair], recipe) -> list[Pair]:
    """Drop duplicate pairs, keeping the first; give pairs that share a question distinct questions.

    A pair is a duplicate of a kept one only when their answers are near-identical (word Jaccard
    similarity ``data.dedup_threshold`` or more) and so are their questions: the same normalized
    question, or a question and answer that together reach that similarity (MinHash LSH,
    datasketch). Both must also state the same figures: pairs that differ in a number (a price, a
    model code) hold different facts. At a threshold of 1 only exact duplicates (same question, same
    answer) go.

    A knowledge base may ask one question several times with a different answer each time (MedQuAD
    splits a topic that way); each such pair is a fact of its own, so its question gets the focus of
    its answer (see :func:`distinct_question`) and the first keeps its question as it is.
    """
    from datasketch import MinHash, MinHashLSH

    threshold = recipe.data.dedup_threshold
    questions = [" ".join(_words(p.question)) for p in pairs]
    answers = [_words(p.answer) for p in pairs]
    answer_sets = [set(a) for a in answers]
    both = [set(_words(p.question)) | s or {""} for p, s in zip(pairs, answer_sets)]
    near = threshold < 1 and len(pairs) > 1
    if near:
        hashes = MinHash.bulk([[w.encode() for w in ws] for ws in both], num_perm=NUM_PERM)
        lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    drops = _Drops()
    by_question: dict[str, list[int]] = {}
    kept: list[int] = []
    for i, pair in enumerate(pairs):
        twin = next((j for j in by_question.get(questions[i], ())
                     if answers[j] == answers[i] or (near and _figures(answer_sets[j]) == _figures(answer_sets[i])
                                                     and _jaccard(answer_sets[j], answer_sets[i]) >= threshold)),
                    None)
        reason = SAME_ANSWER if twin is not None else None
        if twin is None and near:
            # Similar questions inflate the similarity of question plus answer, so the answers must be
            # near-identical on their own too; pairs with the same question were compared above.
            twin = next((j for j in lsh.query(hashes[i]) if questions[j] != questions[i]
                         and _figures(both[j]) == _figures(both[i]) and hashes[j].jaccard(hashes[i]) >= threshold
                         and _jaccard(answer_sets[j], answer_sets[i]) >= threshold), None)
            reason = NEAR_PAIR
        if twin is not None:
            drops.add(reason, pair, duplicate_of=pairs[twin].source or pairs[twin].question)
            continue
        if near:
            lsh.insert(i, hashes[i])
        by_question.setdefault(questions[i], []).append(i)
        kept.append(i)

    out, renamed = _distinct_questions([pairs[i] for i in kept])
    note("near_duplicates_removed", sum(drops.counts.values()))
    note("dedup", {"dropped": dict(drops.counts), "examples": drops.examples,
                   "questions_made_distinct": len(renamed), "distinct_question_examples": renamed[:EXAMPLES]})
    return out


_ARTICLE = re.compile(r"^(?:a|an|the)\s+", re.I)
_LIST_MARK = re.compile(r"^\s*(?:[-\u2013\u2022*]|\d+[.)])\s+")
_SUBJECT_END = re.compile(
    r"\s(?:is|are|was|were|stands? for|refers? to|means?|can(?:not)?|can't|may|might|will|should|must|does|do|"
    r"did|has|have|had|helps?|causes?|affects?|occurs?|happens?|includes?|involves?|makes?|lowers?|raises?)\b",
    re.I)
_PRONOUNS = {"it", "they", "this", "these", "that", "those", "he", "she", "we", "you", "i", "there", "most", "some",
             "many", "people", "what", "which", "who", "how", "why", "when", "where"}
_TRAILING = {"a", "an", "the", "of", "to", "in", "on", "for", "and", "or", "but", "with", "your", "you", "by", "at",
             "from", "as", "is", "are", "was", "were", "be", "been", "that", "this", "which", "who", "their", "its",
             "if", "when", "there", "all", "also", "can", "may", "will", "not", "more", "most", "some", "any", "each",
             "such", "than", "very", "it", "they", "we", "has", "have", "had", "do", "does"}


def _first_sentence(text: str) -> str:
    """The answer's first sentence, up to the first full stop, colon, list dash or line break."""
    return re.split(r"(?<=[.!?:;])\s|\s[-\u2013\u2022*]\s|\n", text.strip(), maxsplit=1)[0].strip()


def _phrase(words: list[str]) -> str:
    """Words up to the first comma, trimmed of punctuation, a leading article and trailing function words."""
    text = " ".join(words).strip(" \t.,;:!?\"'()[]")
    head = text.split(",")[0]
    words = (head if len(head.split()) >= 2 else text).split()
    while words and words[-1].lower().strip(".,;:!?\"'()") in _TRAILING:
        words.pop()
    return _ARTICLE.sub("", " ".join(words).strip(" .,;:!?\"'()[]"))


def answer_focus(answer: str, max_words: int = 6) -> list[str]:
    """What an answer is about, as short phrases from its first sentence, best first.

    The subject before the first verb ("LDL" in "LDL stands for ..."), then the sentence's leading
    ``max_words`` and twice as many words; a pronoun subject ("It is ...") is skipped.
    """
    first = _first_sentence(_LIST_MARK.sub("", answer))
    candidates = []
    match = _SUBJECT_END.search(first)
    if match:
        subject = _phrase(first[:match.start()].split())
        if subject and len(subject.split()) <= max_words and subject.lower() not in _PRONOUNS:
            candidates.append(subject)
    words = first.split()
    for n in (max_words, 2 * max_words):
        lead = _phrase(words[:n])
        if lead:
            candidates.append(lead)
    return list(dict.fromkeys(candidates))


def distinct_question(question: str, focus: str) -> str:
    """``question`` narrowed to ``focus``: "What is X ?" and "LDL" give "What is X: LDL?"."""
    stripped = question.rstrip()
    end = "?" if stripped.endswith("?") else ""
    return f"{stripped.rstrip('?.!:; ').rstrip()}: {focus}{end}"


def _distinct_questions(pairs: list[Pair]) -> tuple[list[Pair], list[dict]]:
    """The pairs, each whose normalized question an earlier pair already has given a question of its own.

    The new question names the focus of its answer (:func:`answer_focus`), else "part N" as a last
    resort; the generator's paraphrases rephrase the shared question, so they are dropped. Also
    returns one ``{"question", "now", "source"}`` per renamed pair.
    """
    taken = {" ".join(_words(p.question)) for p in pairs}
    seen: Counter = Counter()
    out, renamed = [], []
    for pair in pairs:
        norm = " ".join(_words(pair.question))
        seen[norm] += 1
        if seen[norm] == 1:
            out.append(pair)
            continue
        candidates = [distinct_question(pair.question, f) for f in answer_focus(pair.answer)]
        new = next((q for q in candidates if " ".join(_words(q)) not in taken), None)
        n = seen[norm]
        while new is None or " ".join(_words(new)) in taken:
            new = distinct_question(pair.question, f"part {n}")
            n += 1
        taken.add(" ".join(_words(new)))
        renamed.append({"question": pair.question, "now": new, "source": pair.source})
        out.append(replace(pair, question=new, paraphrases=[]))
    return out, renamed


# --- length ---------------------------------------------------------------------------------------

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
