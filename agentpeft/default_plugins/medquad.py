"""MedQuAD loader: NIH question/answer XML (one ``<Document>`` per file) becomes Q/A Documents.

Each ``<QAPair>`` with a non-empty ``<Answer>`` gives one Document: ``page_content`` is the answer,
metadata ``source``, ``line`` (the pair's line in the file), ``question``, ``focus``, ``qtype``,
``qid``, ``url`` and ``collection``. Some MedQuAD collections ship with their answers removed for
copyright reasons; such a pair holds nothing to learn, so it is left out (a file whose answers are
all empty yields nothing and ingest lists it among the empty files).
"""

from __future__ import annotations

import re
from pathlib import Path

from langchain_core.documents import Document
from lxml import etree

from ..errors import AgentpeftError
from ..hookspecs import hookimpl
from ..pipeline.ingest import Loader, read_bytes


#: MedQuAD's root element; one CDC file (0000397) uses the older name <DiseaseFile>.
_ROOTS = ("Document", "DiseaseFile")


def _clean(text: str | None) -> str:
    """Strip the XML indentation from every line; keep paragraph breaks."""
    lines = (line.strip() for line in (text or "").splitlines())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def load_medquad(path: Path) -> list[Document]:
    """One Document per answered question of a MedQuAD XML file."""
    data = read_bytes(path)
    # no network, no external or custom entity expansion: a knowledge base is untrusted input
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False)
    try:
        root = etree.fromstring(data, parser)
    except etree.XMLSyntaxError as exc:
        raise AgentpeftError(f"{path}:{exc.lineno or 1}: malformed XML ({exc.msg}); fix or remove the file") from None
    except (etree.LxmlError, ValueError) as exc:
        raise AgentpeftError(f"{path}: cannot parse XML ({exc}); fix or remove the file") from None
    if root.tag not in _ROOTS:
        raise AgentpeftError(f"{path}:{root.sourceline or 1}: root element <{root.tag}> is not a MedQuAD "
                             "<Document>; remove the file or drop the medquad loader")
    extra = {"focus": _clean(root.findtext("Focus")), "url": root.get("url", ""),
             "collection": root.get("source", "")}
    docs: list[Document] = []
    for index, pair in enumerate(root.iter("QAPair"), 1):
        question_el, answer_el = pair.find("Question"), pair.find("Answer")
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
