"""MedQuAD loader: NIH question/answer XML (one document per file) becomes Q/A Documents.

MedQuAD writes its files in two schemas, both read here:

- ``<Document source url>`` with ``<Focus>`` and ``<QAPairs>/<QAPair>/<Question>``, ``<Answer>`` (most
  collections; one CDC file names its root ``<DiseaseFile>``);
- ``<doc corpus url>`` with ``<doctitle-focus>`` and ``<qaPairs>/<pair>/<question>``, ``<answer>`` (a few
  NINDS files).

Each pair with a non-empty answer gives one Document: ``page_content`` is the answer, metadata
``source``, ``line`` (the pair's line in the file), ``question``, ``focus``, ``qtype``, ``qid``, ``url``
and ``collection``. Some MedQuAD collections ship with their answers removed for copyright reasons;
such a pair holds nothing to learn, so it is left out (a file whose answers are all empty yields
nothing and ingest lists it among the empty files). A file that is not MedQuAD XML (another root
element) or not well-formed XML is skipped with its reason, so one stray file does not stop a build
over hundreds of others.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from langchain_core.documents import Document
from lxml import etree

from ..hookspecs import hookimpl
from ..pipeline.ingest import Loader, SkipFile, read_bytes


@dataclass(frozen=True)
class _Schema:
    """Where one MedQuAD schema keeps the focus, the collection name and the question/answer pairs."""

    focus: str
    collection: str
    pair: str
    question: str
    answer: str


_DOCUMENT = _Schema(focus="Focus", collection="source", pair="QAPair", question="Question", answer="Answer")
#: The schema of each root element MedQuAD uses; CDC file 0000397 names its <Document> root <DiseaseFile>.
_SCHEMAS = {
    "Document": _DOCUMENT,
    "DiseaseFile": _DOCUMENT,
    "doc": _Schema(focus="doctitle-focus", collection="corpus", pair="pair", question="question", answer="answer"),
}


def _clean(text: str | None) -> str:
    """Strip the XML indentation from every line; keep paragraph breaks."""
    lines = (line.strip() for line in (text or "").splitlines())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def load_medquad(path: Path) -> list[Document]:
    """One Document per answered question of a MedQuAD XML file (either schema).

    Raises :class:`SkipFile` for a file that is not well-formed XML or whose root element is not one
    of MedQuAD's, so ingest skips it and names it with the reason.
    """
    data = read_bytes(path)
    # no network, no external or custom entity expansion: a knowledge base is untrusted input
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False)
    try:
        root = etree.fromstring(data, parser)
    except etree.XMLSyntaxError as exc:
        raise SkipFile(path, f"malformed XML, line {exc.lineno or 1}: {exc.msg}") from None
    except (etree.LxmlError, ValueError) as exc:
        raise SkipFile(path, f"cannot parse XML ({exc})") from None
    schema = _SCHEMAS.get(root.tag)
    if schema is None:
        raise SkipFile(path, f"line {root.sourceline or 1}: root element <{root.tag}> is not MedQuAD's "
                             "<Document> or <doc>")
    extra = {"focus": _clean(root.findtext(schema.focus)), "url": root.get("url", ""),
             "collection": root.get(schema.collection, "")}
    docs: list[Document] = []
    for index, pair in enumerate(root.iter(schema.pair), 1):
        question_el, answer_el = pair.find(schema.question), pair.find(schema.answer)
        question = _clean("".join(question_el.itertext())) if question_el is not None else ""
        answer = _clean("".join(answer_el.itertext())) if answer_el is not None else ""
        if not question or not answer:
            continue
        docs.append(Document(page_content=answer, metadata={
            "source": str(path), "line": pair.sourceline or index, "question": question,
            "qtype": question_el.get("qtype", ""), "qid": question_el.get("qid", ""), **extra}))
    return docs


@hookimpl
def register_loaders(register):
    register(Loader("medquad", (".xml",), load_medquad))
