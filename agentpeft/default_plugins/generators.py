"""Built-in generators: FAQ sections and fact bullets become question/answer pairs."""

from __future__ import annotations

import re

from ..hookspecs import hookimpl
from ..pipeline.dataset import Generator, Pair

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
        yield Pair(question=heading, answer=_BOLD.sub(r"\1", text), key=bold.group(1) if bold else None,
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


@hookimpl
def register_generators(register):
    register(Generator("faq", faq_pairs))
    register(Generator("facts", fact_pairs))
