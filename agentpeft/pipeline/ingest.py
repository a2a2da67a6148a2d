"""Stage 1, ingest: a knowledge-base folder or file becomes LangChain Documents."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from langchain_core.documents import Document

from ..errors import AgentpeftError
from ..plugins import collect
from ..progress import bar


@dataclass(frozen=True)
class Loader:
    """Reads one kind of file into Documents (with ``source`` and ``line`` metadata)."""

    name: str
    suffixes: tuple[str, ...]
    load: Callable[[Path], list[Document]]


def get_loaders() -> dict[str, Loader]:
    """Every registered loader by name."""
    return {loader.name: loader for loader in collect("register_loaders")}


def ingest(kb: Path | str, loaders: list[str] | None = None) -> list[Document]:
    """Load every file under ``kb`` that one of the named loaders reads."""
    kb = Path(kb)
    available = get_loaders()
    names = loaders or list(available)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise AgentpeftError(f"unknown loader(s) {unknown}; registered loaders: {sorted(available)}")
    by_suffix = {s: available[n] for n in names for s in available[n].suffixes}
    if not kb.exists():
        raise AgentpeftError(f"knowledge base {kb} does not exist; point --kb at a folder of documents")
    files = [kb] if kb.is_file() else sorted(p for p in kb.rglob("*") if p.is_file())
    readable = [f for f in files if f.suffix.lower() in by_suffix]
    if not readable:
        raise AgentpeftError(
            f"knowledge base {kb} holds no file that the loaders read ({', '.join(sorted(by_suffix))}); "
            "add documents or point --kb elsewhere"
        )
    documents: list[Document] = []
    for path in bar(iterable=readable, desc="ingest", unit="file"):
        documents.extend(by_suffix[path.suffix.lower()].load(path))
    if not documents:
        raise AgentpeftError(f"knowledge base {kb} is empty: its files hold no text; add documents and retry")
    return documents
