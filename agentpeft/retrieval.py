"""Knowledge-base chunks as stored in a registry entry (``kb.jsonl``), BM25 search over their passages, and
the prompt of retrieval-augmented mode, shared by training, evaluation, ``load_llm`` and ``kb_search``."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

from langchain_core.documents import Document

from .errors import AgentpeftError

KB_FILE = "kb.jsonl"
_WORD = re.compile(r"[a-z0-9]+")
#: Words that carry no topic: a question shares them with every passage, so they would retrieve noise.
STOPWORDS = frozenset(
    "a an the and or but of to in on at for from by with without is are was were be been being am do does did "
    "doing have has had having it its this that these those i me my mine you your yours we us our ours they them "
    "their he she his her what which who whom whose when where why how can could will would shall should may "
    "might must not no yes if then than so as about into over under again there here any all each every some "
    "such only own same too very just also get got please tell know want need like hi hello hey thanks thank "
    "one s t".split())
#: Longest passage, in characters: a section is cut into passages of whole sentences up to this length
#: (about 110 tokens: two passages and a question fit retrieval.max_seq_len).
PASSAGE_CHARS = 500
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n\s*\n|\n(?=\s*(?:[-*+]|\d+[.)])\s)")


@functools.lru_cache(maxsize=1)
def _stemmer():
    import snowballstemmer

    return snowballstemmer.stemmer("english")


def tokenize(text: str) -> list[str]:
    """The BM25 terms: lower-case alphanumeric words without stopwords, Snowball-stemmed so that a question's
    "cancelling" or "desks" finds a page's "cancel" and "desk"."""
    return _stemmer().stemWords([w for w in _WORD.findall(text.lower()) if w not in STOPWORDS])


def passages(documents: list[Document], max_chars: int = PASSAGE_CHARS) -> list[Document]:
    """The knowledge base as passages: each section cut at sentence and list-item boundaries into pieces
    of at most ``max_chars`` characters (a longer sentence is a passage of its own), with the section's
    metadata, so that a passage put into a prompt is never cut mid-fact."""
    out: list[Document] = []
    for doc in documents:
        text = doc.page_content.strip()
        if not text:
            continue
        if len(text) <= max_chars:
            out.append(doc)
            continue
        pieces = [p.strip() for p in _SENTENCE_END.split(text) if p and p.strip()]
        current = ""
        for piece in pieces:
            if current and len(current) + 1 + len(piece) > max_chars:
                out.append(Document(page_content=current, metadata=doc.metadata))
                current = piece
            else:
                current = f"{current} {piece}".strip() if current else piece
        if current:
            out.append(Document(page_content=current, metadata=doc.metadata))
    return out


def save_chunks(documents: list[Document], path: Path | str) -> Path:
    """Write Documents as JSON lines ({"text", "metadata"}), the knowledge base a registered model carries."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for doc in documents:
            fh.write(json.dumps({"text": doc.page_content, "metadata": doc.metadata}, ensure_ascii=False,
                                default=str) + "\n")
    return path


def load_chunks(path: Path | str) -> list[Document]:
    """Read the chunks written by :func:`save_chunks`."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise AgentpeftError(f"cannot read knowledge-base chunks {path}: {exc.strerror}; rebuild the model") from None
    docs = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            docs.append(Document(page_content=row["text"], metadata=row.get("metadata") or {}))
        except (ValueError, KeyError, TypeError):
            raise AgentpeftError(f"{path}:{number}: not a knowledge-base chunk; rebuild the model") from None
    return docs


def passage_text(doc: Document) -> str:
    """What is indexed and shown for a chunk: its heading or question, then its text."""
    meta = doc.metadata
    title = meta.get("question") or " / ".join(h for h in meta.get("headings") or [] if h) or meta.get("heading") or ""
    return f"{title}\n{doc.page_content}".strip() if title else doc.page_content


def cite(doc: Document) -> str:
    """A short source reference: file name and line."""
    source = doc.metadata.get("source")
    name = Path(source).name if source else "?"
    return f"{name}:{doc.metadata['line']}" if doc.metadata.get("line") else name


class BM25Index:
    """Okapi BM25 (rank_bm25) over the passages of knowledge-base chunks (:func:`passages`)."""

    def __init__(self, documents: list[Document]):
        from rank_bm25 import BM25Okapi

        self.documents = passages([d for d in documents if d.page_content.strip()])
        if not self.documents:
            raise AgentpeftError("the knowledge base has no text to search; rebuild with a non-empty knowledge base")
        self._bm25 = BM25Okapi([tokenize(passage_text(d)) or ["_"] for d in self.documents])

    def search(self, query: str, k: int = 3) -> list[tuple[Document, float]]:
        """The ``k`` best chunks for ``query`` with their scores; chunks sharing no term are left out."""
        terms = tokenize(query)
        if not terms:
            return []
        scores = self._bm25.get_scores(terms)
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        return [(self.documents[i], float(scores[i])) for i in order[:k] if scores[i] > 0]


#: A passage line that starts like a label of the prompt ("Question:", "Passages:", "[2]"): quoted with "> ", so
#: that knowledge-base text cannot pose as the user's question or open passages of its own.
_LABEL_LINE = re.compile(r"(?im)^(\s*(?:question|passages)\s*:|\s*\[\d+\])")


def augment_question(question: str, found: list[Document]) -> str:
    """The user turn of retrieval-augmented mode: numbered passages, then the question (the question alone
    when no passage shares a word with it, as for a general question)."""
    if not found:
        return question
    lines = [f"[{i}] " + _LABEL_LINE.sub(r"> \1", passage_text(d)) for i, d in enumerate(found, 1)]
    return "Passages:\n" + "\n".join(lines) + f"\n\nQuestion: {question}"


def retrieve(index: BM25Index, question: str, k: int) -> list[Document]:
    """The top ``k`` passages for ``question``: what every retrieval-augmented prompt is given."""
    return [doc for doc, _ in index.search(question, k)]
