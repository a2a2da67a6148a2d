"""Knowledge-base chunks as stored in a registry entry (``kb.jsonl``) and BM25 search over them."""

from __future__ import annotations

import json
import re
from pathlib import Path

from langchain_core.documents import Document

from .errors import AgentpeftError

KB_FILE = "kb.jsonl"
_WORD = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """Lower-case alphanumeric words: the BM25 terms."""
    return _WORD.findall(text.lower())


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
    """Okapi BM25 (rank_bm25) over knowledge-base chunks."""

    def __init__(self, documents: list[Document]):
        from rank_bm25 import BM25Okapi

        self.documents = [d for d in documents if d.page_content.strip()]
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
