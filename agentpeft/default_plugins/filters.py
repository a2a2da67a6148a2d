"""Built-in pair filters: PII redaction, duplicate removal, and token-length bounds that split long answers.

Each filter records for the dataset card what it dropped and why (counts by reason and a few examples).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import replace

from ..hookspecs import hookimpl
from ..pii import redact, replace_known
from ..pairs import Filter, Pair, key_fact, note, stage_tokenizer
from ..pipeline.dataset import EVAL_WRAPPERS, TRAIN_WRAPPERS, context_window, count_tokens

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

    def add(self, reason: str, pair: Pair, **detail) -> None:
        self.counts[reason] += 1
        if sum(1 for e in self.examples if e["reason"] == reason) < EXAMPLES:
            self.examples.append({"reason": reason, "question": _excerpt(pair.question), "source": pair.source,
                                  **{k: _excerpt(v) if isinstance(v, str) else v for k, v in detail.items()}})


def _excerpt(text: str, limit: int = 160) -> str:
    """``text`` cut to ``limit`` characters at a word boundary, marked with an ellipsis where cut."""
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


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
TOO_SHORT = "question or answer too short"
NO_PART_FITS = "no part of the answer fits"
LONG_SENTENCE = "sentence longer than the limit, left out of a split answer"
OVER_WHEN_COUNTED = "part over the limit when counted exactly"
#: How far from the limit an estimated length must be to be trusted without counting the rendered text.
ESTIMATE_SLACK = 8
_PROBE = Pair("What is it?", "It is.")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")
# A line break with the spaces around it, matched from the start of the spaces only (each run is read once).
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])|(?<![ \t])[ \t]*+\n\s*")


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text.strip(), add_special_tokens=False)["input_ids"])


def _later_growth(recipe, tokenizer) -> int:
    """Tokens that the recipe's own filters, which run after this one, add to an answer (a safety note).

    They are run once on a sample pair: what they add must still fit when the pair is rendered.
    """
    from ..pipeline.dataset import get_filters

    later = [n for n in recipe.data.filters if n not in ("pii", "dedup", "length")]
    if not later:
        return 0
    filters, probe = get_filters(), [replace(_PROBE, paraphrases=[])]
    for name in later:
        if name in filters and probe:
            probe = list(filters[name].apply(probe, recipe))
    return max(0, _n_tokens(tokenizer, probe[0].answer) - _n_tokens(tokenizer, _PROBE.answer)) if probe else 0


def _longest_phrasing(tokenizer, pair: Pair, question: str) -> str:
    """The longest form ``question`` takes in train or eval: as written, a paraphrase, or a phrasing wrapper."""
    if not pair.held_out:
        return question
    lc = question[:1].lower() + question[1:]
    # The generator's paraphrases rephrase the pair's own question; a part's new question has none.
    forms = [question, *(pair.paraphrases if question == pair.question else ()),
             *(w.format(q=question, lc=lc, lower=question.lower().rstrip("?").strip())
               for w in TRAIN_WRAPPERS + EVAL_WRAPPERS)]
    lengths = [len(ids) for ids in tokenizer([f.strip() for f in forms], add_special_tokens=False)["input_ids"]]
    return forms[lengths.index(max(lengths))]


class _Measure:
    """Tokens of one pair's conversations as train and eval render them, estimated where far from the limit."""

    def __init__(self, tokenizer, system: str | None, pair: Pair, growth: int) -> None:
        self.tokenizer, self.system, self.pair, self.growth = tokenizer, system, pair, growth
        self.longest = _longest_phrasing(tokenizer, pair, pair.question)
        self.fixed = count_tokens(tokenizer, system, self.longest, "")[1] + growth
        self.question_tokens = _n_tokens(tokenizer, pair.question)
        self._fixed: dict[str, int] = {pair.question: self.fixed}

    def tokens(self, question: str, answer: str, exact: bool = False, limit: int | None = None) -> int:
        """The longest rendered conversation of ``question`` and ``answer``, in tokens.

        The template's tokens plus the answer's own make the total, give or take a token where they
        meet, and another question phrased the same way adds its own length; a total within
        ``ESTIMATE_SLACK`` of ``limit`` (or any total, with ``exact``) is counted on the rendered text.
        """
        if question not in self._fixed:
            self._fixed[question] = self.fixed + _n_tokens(self.tokenizer, question) - self.question_tokens
        estimate = self._fixed[question] + _n_tokens(self.tokenizer, answer)
        if not exact and (limit is None or abs(estimate - limit) > ESTIMATE_SLACK):
            return estimate
        longest = _longest_phrasing(self.tokenizer, self.pair, question)
        return count_tokens(self.tokenizer, self.system, longest, answer)[1] + self.growth


def _spans(text: str, breaks: re.Pattern, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """The non-blank stretches of ``text[start:end]`` between ``breaks``, as (start, end) offsets in ``text``."""
    end = len(text) if end is None else end
    out, pos = [], start
    for m in breaks.finditer(text, start, end):
        out.append((pos, m.start()))
        pos = m.end()
    out.append((pos, end))
    return [(s, e) for s, e in out if text[s:e].strip()]


def part_question(question: str, index: int, total: int, focus: str) -> str:
    """The question of one part of a split answer: "What is X? (part 2 of 3: LDL)"."""
    return f"{question.rstrip()} (part {index} of {total}{': ' + focus if focus else ''})"


def split_answer(pair: Pair, fits, drops: _Drops | None = None) -> list[Pair]:
    """``pair`` as parts that each fit: its answer cut at paragraph, then sentence boundaries.

    ``fits(question, answer)`` says whether a pair fits. Each part is a run of whole paragraphs (or,
    inside a paragraph too long for one part, of whole sentences) copied from the answer, with a
    question naming the part and what it starts with; its key is the pair's key where the part holds
    it, else the part's own key fact. A sentence that cannot fit at all is left out (and counted in
    ``drops``).
    """
    text = pair.answer

    def question(index: int, total: int, start: int) -> str:
        focus = answer_focus(text[start:], max_words=4)
        return part_question(pair.question, index, total, focus[0] if focus else "")

    # Labels are measured at their widest: no answer has more parts than sentences.
    bound = max(len(_spans(text, _SENTENCE_BREAK)), 1)
    units: list[tuple[int, int]] = []
    for s, e in _spans(text, _PARAGRAPH_BREAK):
        if fits(question(bound, bound, s), text[s:e]):
            units.append((s, e))
        else:
            units += _spans(text, _SENTENCE_BREAK, s, e)
    parts: list[tuple[int, int]] = []
    i = 0
    while i < len(units):
        start, asked = units[i][0], question(bound, bound, units[i][0])
        if not fits(asked, text[start:units[i][1]]):
            if drops is not None:
                drops.add(LONG_SENTENCE, pair, sentence=text[start:units[i][1]])
            i += 1
            continue
        # The longest run of units from here that fits; a run that holds a unit too long alone never fits.
        lo, hi = i, len(units) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(asked, text[start:units[mid][1]]):
                lo = mid
            else:
                hi = mid - 1
        parts.append((start, units[lo][1]))
        i = lo + 1
    out = []
    for index, (s, e) in enumerate(parts, 1):
        answer, asked = text[s:e].strip(), question(index, len(parts), s)
        key = pair.key if pair.key and pair.key in answer else (key_fact(answer) if pair.key else None)
        out.append(replace(pair, question=asked, answer=answer, key=key, paraphrases=[]))
    return out


def length_filter(pairs: list[Pair], recipe) -> list[Pair]:
    """Fit every pair into the smaller of max_seq_len and the model's context window; split long answers.

    A pair fits when its conversation, rendered as train and eval render it (the longest phrasing of
    its question, the answer as the recipe's later filters leave it), is within the limit in the base
    model's tokens. A longer answer becomes parts that each fit (:func:`split_answer`); pairs with a
    question or answer too short to hold a fact are dropped.
    """
    tokenizer = stage_tokenizer(recipe)
    limit = min(recipe.train.max_seq_len, context_window(tokenizer))
    growth = _later_growth(recipe, tokenizer)
    drops = _Drops()
    kept: list[Pair] = []
    split_answers = split_parts = 0
    for pair in pairs:
        if (_n_tokens(tokenizer, pair.question) < MIN_QUESTION_TOKENS
                or _n_tokens(tokenizer, pair.answer) < MIN_ANSWER_TOKENS):
            drops.add(TOO_SHORT, pair)
            continue
        measure = _Measure(tokenizer, recipe.system_prompt if pair.system else None, pair, growth)

        def fits(question: str, answer: str, measure: _Measure = measure) -> bool:
            return measure.tokens(question, answer, limit=limit) <= limit

        if fits(pair.question, pair.answer):
            kept.append(pair)
            continue
        parts = []
        for part in split_answer(pair, fits, drops):
            if measure.tokens(part.question, part.answer, exact=True) <= limit:
                parts.append(part)
            else:
                drops.add(OVER_WHEN_COUNTED, part)
        if not parts:
            drops.add(NO_PART_FITS, pair)
            continue
        split_answers += 1
        split_parts += len(parts)
        kept += parts
    note("length", {"limit_tokens": limit, "reserved_for_later_filters": growth,
                    "too_short": drops.counts[TOO_SHORT], "too_long": drops.counts[NO_PART_FITS],
                    "split": {"answers": split_answers, "parts": split_parts}, "dropped": dict(drops.counts),
                    "examples": drops.examples})
    return kept


@hookimpl
def register_filters(register):
    register(Filter("pii", pii_filter))
    register(Filter("dedup", dedup_filter))
    register(Filter("length", length_filter))
