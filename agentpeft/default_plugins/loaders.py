"""Built-in knowledge-base loaders."""

from __future__ import annotations

import re
from pathlib import Path

from langchain_core.documents import Document

from ..errors import AgentpeftError
from ..hookspecs import hookimpl
from ..pipeline.ingest import Loader

_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise AgentpeftError(f"{path} is not UTF-8 text (byte {exc.start}); convert it or remove it from the knowledge base") from None


def load_markdown(path: Path) -> list[Document]:
    """One Document per heading section, with the heading path as metadata."""
    lines = _read_text(path).splitlines()
    docs: list[Document] = []
    trail: list[str] = []
    start, body = 1, []

    def flush() -> None:
        text = "\n".join(body).strip()
        if text or trail:
            docs.append(Document(
                page_content=text,
                metadata={"source": str(path), "line": start, "heading": trail[-1] if trail else "",
                          "headings": list(trail), "title": trail[0] if trail else path.stem},
            ))

    in_code = False
    for number, line in enumerate(lines, 1):
        if line.lstrip().startswith("```"):
            in_code = not in_code
        match = None if in_code else _HEADING.match(line)
        if match:
            flush()
            level = len(match.group(1))
            trail = trail[: level - 1] + [""] * max(0, level - 1 - len(trail)) + [match.group(2)]
            start, body = number, []
        else:
            body.append(line)
    flush()
    return [d for d in docs if d.page_content]


@hookimpl
def register_loaders(register):
    register(Loader("markdown", (".md", ".markdown"), load_markdown))
