"""Built-in generators: FAQ sections, fact bullets, explicit Q/A documents, section text and a teacher LLM."""

from __future__ import annotations

import re
import zlib

from ..hookspecs import hookimpl
from ..pairs import Generator, Pair, key_fact

_BOLD = re.compile(r"\*\*(.+?)\*\*")
_FACT = re.compile(r"^\s*[-*]\s+\*\*(.+?):\*\*\s*(.+?)\s*$")


def faq_pairs(documents):
    """A section whose heading is a question gives a pair; its bold span is the key fact."""
    for doc in documents:
        heading = doc.metadata.get("heading", "")
        if not heading.endswith("?"):
            continue
        text = " ".join(line.strip() for line in doc.page_content.splitlines() if line.strip())
        bold = _BOLD.search(text)
        answer = _BOLD.sub(r"\1", text)
        yield Pair(question=heading, answer=answer, key=bold.group(1) if bold else key_fact(answer),
                   source=f"{doc.metadata['source']}:{doc.metadata['line']}")


def _subject(heading: str) -> str:
    return heading if heading.lower().startswith("the ") else f"the {heading}"


def fact_pairs(documents):
    """A bullet ``- **Attribute:** value`` under a heading gives a pair about that heading's subject."""
    for doc in documents:
        heading = doc.metadata.get("heading", "")
        if not heading or heading.endswith("?"):
            continue
        subject = _subject(heading)
        for offset, line in enumerate(doc.page_content.splitlines()):
            match = _FACT.match(line)
            if not match:
                continue
            attr, value = match.group(1).strip(), match.group(2).strip().rstrip(".")
            a = attr.lower()
            yield Pair(
                question=f"What is the {a} of {subject}?",
                answer=f"The {a} of {subject} is {value}.",
                key=value,
                source=f"{doc.metadata['source']}:{doc.metadata['line'] + offset + 1}",
                paraphrases=[f"What's {subject}'s {a}?", f"Tell me the {a} of {subject}.",
                             f"{subject[0].upper() + subject[1:]}: what {a} does it have?"],
            )


def qa_pairs(documents):
    """Documents that carry ``metadata["question"]`` (CSV, JSONL, YAML, MedQuAD loaders) pass through as they are."""
    for doc in documents:
        question = str(doc.metadata.get("question") or "").strip()
        answer = doc.page_content.strip()
        if not question or not answer:
            continue
        key = doc.metadata.get("key")
        yield Pair(question=question, answer=answer, key=str(key).strip() if key else None,
                   source=f"{doc.metadata.get('source', '')}:{doc.metadata.get('line', 0)}")


# Each pattern here reads a run of characters once: a fence line's indent is spaces and tabs (with
# ``\s*`` every blank line re-read the blank lines after it), a link's text holds no "[" (so "[[[[" is
# not read again from each bracket), and the numbers and domain names of _SLOTS have a bounded length
# (25 digits and commas, a domain label's 63 characters).
_FENCE = re.compile(r"^[ \t]*+(```|~~~).*?^[ \t]*+\1[ \t]*+$", re.M | re.S)
_LINK = re.compile(r"!?\[([^\[\]]*+)\]\([^)]*+\)")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"(])")
_BULLET = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+")
_COPULA = re.compile(
    r"^(?P<subj>(?:The|Our|Your|All|Each|Every|Most|Some)\s[\w' -]{2,60}?|[A-Z][\w-]*(?:\s[A-Z][\w-]*){0,4})"
    r"\s(?P<verb>is|are|was|were)\s(?P<pred>.+?)\.?$")
_DEFINITE = re.compile(r"^(?:a|an|the|one|two|three|four|five|six|seven|eight|nine|ten|\d|[$€£])", re.I)
_VERBS = (
    (re.compile(r"^(?P<subj>.{3,60}?)\s(?P<verb>costs?|is priced at)\s(?P<obj>.+?)\.?$"), "How much {do} {subj} cost?"),
    (re.compile(r"^(?P<subj>.{3,60}?)\s(?P<verb>lasts?)\s(?P<obj>.+?)\.?$"), "How long {do} {subj} last?"),
    (re.compile(r"^(?P<subj>.{3,60}?)\s(?P<verb>takes?)\s(?P<obj>.*\d.*?)\.?$"), "How long {do} {subj} take?"),
    (re.compile(r"^(?P<subj>.{3,60}?)\s(?P<verb>weighs?)\s(?P<obj>.+?)\.?$"), "How much {do} {subj} weigh?"),
)
_HOW_TO = (
    (re.compile(r"^To (?P<act>[a-z][^,]{3,80}), (?P<rest>.+)$"), "How do I {act}?"),
    (re.compile(r"^You can (?P<act>[a-z][^,]{3,80}?) by (?P<rest>.+)$"), "How can I {act}?"),
    (re.compile(r"^If (?P<act>[^,]{3,80}), (?P<rest>.+)$"), "What should I do if {act}?"),
)
_DETERMINERS = ("The", "Our", "Your", "All", "Each", "Every", "Most", "Some")
_PRONOUN = re.compile(r"^(?:it|they|this|these|that|those|he|she|we|you|i)$", re.I)


def _plain(text: str) -> str:
    text = _LINK.sub(r"\1", _FENCE.sub(" ", text))
    return re.sub(r"\*\*|__|(?<!\w)[*_](?=\S)|(?<=\S)[*_](?!\w)", "", text)


def sentences(text: str) -> list[str]:
    """The sentences of a section's prose (code blocks dropped, each list item one sentence)."""
    out: list[str] = []
    for block in re.split(r"\n\s*\n", _plain(text)):
        lines = [ln for ln in block.splitlines() if ln.strip() and not ln.lstrip().startswith(("#", "|", ">"))]
        if not lines:
            continue
        if all(_BULLET.match(ln) for ln in lines):
            out += [_BULLET.sub("", ln).strip() for ln in lines]
            continue
        paragraph = " ".join(_BULLET.sub("", ln).strip() for ln in lines)
        out += [s.strip() for s in _SENTENCE_END.split(paragraph) if s.strip()]
    return [s for s in out if len(s.split()) >= 3]


def _subject_phrase(subj: str) -> str:
    words = subj.split()
    # "The hub" -> "the hub", "Firmware updates" -> "firmware updates"; "Hearth Hub" keeps its capitals.
    if words[0] in _DETERMINERS or (len(words) > 1 and words[1].islower() and words[0][1:].islower()):
        return subj[0].lower() + subj[1:]
    return subj


def _sentence_question(sentence: str) -> tuple[str, str] | None:
    """A question the sentence answers, and the part of the sentence that holds its key fact."""
    for pattern, template in _HOW_TO:
        m = pattern.match(sentence)
        if m:
            return template.format(act=m["act"].strip()), m["rest"]
    for pattern, template in _VERBS:
        m = pattern.match(sentence)
        if m and not _PRONOUN.match(m["subj"]) and any(c.isdigit() for c in m["obj"]):
            do = "does" if m["verb"].endswith("s") else "do"
            return template.format(subj=_subject_phrase(m["subj"]), do=do), m["obj"]
    m = _COPULA.match(sentence)
    if m and not _PRONOUN.match(m["subj"]) and _DEFINITE.match(m["pred"]):
        return f"What {m['verb']} {_subject_phrase(m['subj'])}?", m["pred"]
    return None


def _mentions(question: str, heading: str) -> bool:
    words = {w for w in re.findall(r"[a-z0-9]+", heading.lower()) if len(w) > 3}
    return not words or bool(words & set(re.findall(r"[a-z0-9]+", question.lower())))


_NUMBER_WORDS = "one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|fifteen|twenty|thirty|forty|fifty|hundred"
_UNITS = {"minute": "minutes", "hour": "hours", "day": "days", "week": "weeks", "month": "months", "year": "years",
          "business day": "business days", "working day": "working days", "night": "nights", "second": "seconds"}
_WEEKDAYS = "Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday"
_MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"
# What a prose sentence can state, most specific first: (pattern, question word(s) for it).
_SLOTS = (
    (re.compile(r"[$€£]\s?\d[\d,]{0,24}(?:\.\d+)?(?:\s?(?:per|a|an)\s\w+)?|\b\d[\d,]{0,24}(?:\.\d+)?\s?(?:dollars|euros|pounds|USD|EUR|GBP)\b"),
     "how much"),
    (re.compile(r"\b\d{1,2}(?::\d{2})?\s?(?:a\.m\.|p\.m\.|am|pm|AM|PM)(?=\W|$)|\b(?:noon|midnight)\b|\b\d{1,2}:\d{2}\b"),
     "what time"),
    (re.compile(r"\b\d+(?:\.\d+)?\s?(?:%|percent\b)"), "what percentage"),
    (re.compile(rf"\b(?:\d+|{_NUMBER_WORDS})(?:\s(?:to|or|-)\s(?:\d+|{_NUMBER_WORDS}))?\s"
                r"(?:business |working |calendar )?(?:minute|hour|day|week|month|year|night|second)s?\b", re.I),
     "how long"),
    (re.compile(rf"\b(?:{_WEEKDAYS})s?(?:\s(?:to|through|and|-)\s(?:{_WEEKDAYS})s?)?\b"), "which days"),
    (re.compile(rf"\b(?:{_MONTHS})(?:\s\d{{1,2}}(?:st|nd|rd|th)?)?\b(?:,?\s\d{{4}})?"), "when"),
    (re.compile(r"\b[A-Z]{1,5}-?\d[\w-]*\b|\b[A-Z]{2,}[A-Z0-9]*-[A-Z0-9-]+\b"), "which code"),
    (re.compile(r"\b\d[\d,]{0,24}(?:\.\d+)?\s?(?:kg|g|lb|lbs|km|m|cm|mm|mi|miles|km/h|mph|W|V|GB|MB|TB|lumens|L|ml)\b"),
     "how much"),
    (re.compile(rf"\b(?:up to |at most |at least |maximum of |minimum of )?(?:\d+|{_NUMBER_WORDS})\s(?:[a-z]+\s)?[a-z]{{3,}}s\b",
                re.I), "how many"),
    (re.compile(r"(?<![\w.+-])[\w.+-]++@[\w-]+\.[\w.]+|\b(?:\+?\d[\d ()-]{7,}\d)\b|\bhttps?://\S+|\b[\w-]{1,63}\.(?:com|org|net|io)\b"),
     "which contact"),
)
_STOP = frozenset("a an the and or but of to in on at for from by with is are was were be been it its this that these "
                  "those you your we our they their can will may must should do does did not no if as so than then there "
                  "also any all each every which who what when where how about into over after before up out".split())


def _slots(sentence: str, limit: int = 3) -> list[tuple[re.Match, str]]:
    """The figures, times, days, codes, counts and contacts a sentence states (not overlapping, in order),
    each with the question word for it."""
    found = sorted(((m, wh) for pattern, wh in _SLOTS for m in pattern.finditer(sentence) if m.group(0).strip()),
                   key=lambda f: (f[0].start(), -len(f[0].group(0))))
    picked: list[tuple[re.Match, str]] = []
    for match, wh in found:
        if all(match.start() >= p.end() or match.end() <= p.start() for p, _ in picked):
            picked.append((match, wh))
    return picked[:limit]


def _content_words(text: str, limit: int = 8) -> list[str]:
    words = [w for w in re.findall(r"[A-Za-z][\w'-]+", text) if w.lower() not in _STOP]
    return list(dict.fromkeys(words))[:limit]


_QUALIFIER = re.compile(r"^(?:up to|at most|at least|maximum of|minimum of)\s+", re.I)

# A sentence a user says before the question itself ("I left my card on the train. What does a new one
# cost?"). One trained phrasing of each fact starts with one of these, so that the model answers the
# question and does not repeat the sentence before it.
_PREFACES = (
    "I have a question about {about}.",
    "I was reading about {about} on your site.",
    "A colleague asked me about {about}.",
    "I couldn't find this in the help pages.",
    "I'm new here and this came up today.",
    "We're planning ahead for next month.",
    "This is for a friend of mine.",
    "Something about {about} is not clear to me.",
)


def _prefaced(question: str, about: str) -> str:
    """``question`` after a preface sentence, the same one for the same question on every run."""
    preface = _PREFACES[zlib.crc32(question.encode()) % len(_PREFACES)]
    return f"{preface.format(about=about.lower() if about else 'this')} {question}"


def _figure_questions(sentence: str, heading: str) -> list[tuple[str, list[str], str]]:
    """For each fact a sentence states: a question about it, two other phrasings, and the fact (the key).

    The trained phrasings name the fact's topic in a few content words ("How much: Hearth Hub costs?",
    "I have a question about lamps. Hearth Hub costs, how much?"), as a user's question names it among words
    of their own, the second after a sentence that is not the question; the sentence itself with the fact
    asked for ("The Hearth Hub costs how much?") is held out. A question that echoes its answer sentence
    would teach the model to answer by repeating the question.
    """
    out = []
    for match, wh in _slots(sentence):
        fact = match.group(0).strip().rstrip(".,;")
        before, after = sentence[: match.start()].rstrip(), sentence[match.end():].strip().rstrip(".!")
        if wh == "how many":  # "up to 24 lamps" -> "how many lamps"
            wh = f"how many {fact.split()[-1]}"
        elif wh == "which code" and "code" in before.lower().split()[-2:]:
            wh = "what"
        if len(before.split()) + len(after.split()) < 2:
            continue
        echo = " ".join(p for p in (before, wh, after) if p).rstrip(" ,;:") + "?"
        echo = echo[0].upper() + echo[1:]
        topic = " ".join(_content_words(f"{before} {after}", 7))
        about = heading if heading and heading.lower() not in topic.lower() else ""
        keyword = f"{wh[0].upper()}{wh[1:]}: {topic}{f' ({about})' if about else ''}?"
        inverted = f"{about}: {topic}, {wh}?" if about else f"{topic[0].upper()}{topic[1:]}, {wh}?"
        out.append((keyword, [_prefaced(inverted, heading), echo], _QUALIFIER.sub("", fact)))
    return out


def _section_title(doc) -> str:
    meta = doc.metadata
    heading = (meta.get("heading") or "").strip()
    if heading:
        return heading
    title = str(meta.get("title") or "").strip()
    return f"{title}, page {meta['page']}" if title and meta.get("page") else title


def prose_pairs(documents):
    """Grounded pairs synthesized from prose sections, offline and deterministic.

    Each section gives an overview question answered by its opening sentences, and every sentence that
    states a figure, time, day, code, count or contact (or matches a how-to or definition pattern) gives
    a question about it, answered by that sentence, whose key is the stated fact. Each fact is asked in
    two keyword phrasings (trained) and as its sentence with the fact asked for (held out), so that a
    held-out phrasing has other words in another order. Question headings and question/answer documents are left to the faq
    and qa generators.
    """
    for doc in documents:
        heading = _section_title(doc)
        if not heading or heading.endswith("?") or doc.metadata.get("question"):
            continue
        said = [s for s in sentences(doc.page_content) if not re.match(r"^[\w ]{1,30}:\s*$", s)]
        if not said:
            continue
        source = f"{doc.metadata.get('source', '')}:{doc.metadata.get('line', 0)}"
        overview = said[0] if len(said[0].split()) >= 8 or len(said) == 1 else f"{said[0]} {said[1]}"
        yield Pair(question=f"What should I know about {heading}?", answer=overview, key=key_fact(overview),
                   source=source, paraphrases=[f"Tell me about {heading}.", f"Give me an overview of {heading}."])
        for sentence in said:
            figures = _figure_questions(sentence, heading)
            for question, paraphrases, key in figures:
                yield Pair(question=question, answer=sentence, key=key, source=source, paraphrases=paraphrases)
            found = None if figures else _sentence_question(sentence)
            if found is not None:
                question, fact = found
                if not _mentions(question, heading):
                    question = f"{heading}: {question[0].lower()}{question[1:]}"
                key = key_fact(fact)
                yield Pair(question=question, answer=sentence, key=key if key in sentence else key_fact(sentence),
                           source=source)


def teacher_pairs(documents, recipe):
    """A teacher chat model writes question/answer pairs from each prose chunk; ungrounded pairs are dropped."""
    from ..errors import AgentpeftError
    from ..pipeline.dataset import teacher_model
    from ..teacher import synthesize

    model = teacher_model(recipe)
    if model is None:
        raise AgentpeftError("the teacher generator needs a teacher model: set data.teacher in the recipe or pass "
                             "--teacher (a registered model, 'base', or provider:model such as openai:gpt-4o-mini)")
    return synthesize(model, [d for d in documents if not d.metadata.get("question")])


def general_pairs(documents, recipe):
    """General-knowledge questions with short answers we wrote, trained as a plain chat (train-only).

    Mixed into train, they keep the tuned model answering general questions as a general assistant
    when the recipe's system prompt is absent, which limits forgetting. They ship in
    ``agentpeft/data/general_qa.jsonl`` (``bench/make_general_qa.py``): a pool written with the
    forgetting probe's candidates, kept only where neither question nor answer shares a question or
    key fact with the probe. (The base model's own answers, self-distillation, forgot more and trained
    slower on support-bot: docs/forgetting.md.)
    """
    import json
    import random
    from importlib import resources

    text = resources.files("agentpeft").joinpath("data", "general_qa.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    rows = random.Random(recipe.data.seed).sample(rows, min(recipe.data.general, len(rows)))
    return [Pair(question=r["question"], answer=r["answer"], source="agentpeft:general_qa.jsonl", held_out=False,
                 system=False) for r in rows]


@hookimpl
def register_generators(register):
    register(Generator("faq", faq_pairs))
    register(Generator("facts", fact_pairs))
    register(Generator("qa", qa_pairs))
    register(Generator("prose", prose_pairs))
    register(Generator("teacher", teacher_pairs))
    register(Generator("general", general_pairs))
