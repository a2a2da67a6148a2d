"""tech-docs' ``doc_lookup`` tool: exact lookup of a heading or an API name in a documentation tree."""

from __future__ import annotations

import difflib
import re
from pathlib import Path

from pydantic import BaseModel, Field

from ..hookspecs import hookimpl

_CODE_SPAN = re.compile(r"`([^`\n]+)`")
PROSE_LOADERS = ("markdown", "rst", "html")


def _key(text: str) -> str:
    """Heading or API name as looked up: lower case, no backticks, no call parentheses or end punctuation."""
    text = text.strip().strip("`").lower()
    # "open(path, mode)" -> "open": cut from the first "(" of the last line when that line ends with ")"
    # (found with str methods: the pattern ``\(.*?\)$`` read the rest of the text again from each "(").
    last = text[:-1] if text.endswith("\n") else text
    if last.endswith(")"):
        start = last.find("(", last.rfind("\n") + 1)
        if start >= 0:
            text = text[:start]
    return re.sub(r"\s+", " ", text.replace("`", "")).strip(" ?:.!")


class DocIndex:
    """Sections of a documentation tree, found by their exact heading or by an API name they mention in code."""

    def __init__(self, documents) -> None:
        sections: dict[tuple[str, tuple[str, ...]], dict] = {}
        for doc in documents:
            trail = tuple(doc.metadata.get("headings") or [doc.metadata.get("heading", "")])
            entry = sections.setdefault((doc.metadata["source"], trail), {
                "heading": doc.metadata.get("heading", ""), "source": doc.metadata["source"],
                "line": doc.metadata.get("line", 1), "text": []})
            entry["text"].append(doc.page_content)
        self.sections = [{**s, "text": "\n\n".join(s["text"])} for s in sections.values()]
        self.by_heading: dict[str, list[dict]] = {}
        self.by_name: dict[str, list[dict]] = {}
        for section in self.sections:
            self.by_heading.setdefault(_key(section["heading"]), []).append(section)
            for span in _CODE_SPAN.findall(section["heading"] + "\n" + section["text"]):
                for name in {_key(span), _key(span.split("(")[0])}:
                    if name and section not in self.by_name.setdefault(name, []):
                        self.by_name[name].append(section)

    @classmethod
    def from_path(cls, path: Path) -> "DocIndex":
        from ..pipeline.ingest import get_loaders, ingest

        loaders = [n for n in PROSE_LOADERS if n in get_loaders()]
        return cls(ingest(path, loaders))

    def lookup(self, query: str, limit: int = 3) -> list[dict]:
        """Sections whose heading is ``query``, else sections that mention ``query`` as code (headings first)."""
        key = _key(query)
        if key in self.by_heading:
            return self.by_heading[key][:limit]
        hits = self.by_name.get(key, [])
        return sorted(hits, key=lambda s: key not in _key(s["heading"]))[:limit]

    def suggestions(self, query: str) -> list[str]:
        return difflib.get_close_matches(_key(query), list(self.by_heading) + list(self.by_name), n=5, cutoff=0.6)


class DocLookupInput(BaseModel):
    query: str = Field(description="An exact section heading or API name, e.g. 'load_llm' or 'agentpeft build'.")


def doc_lookup_tool(docs: Path):
    """``doc_lookup`` over the documentation at ``docs``, as a LangChain tool (the index is built on first use)."""
    from langchain_core.tools import StructuredTool

    index: list[DocIndex] = []

    def doc_lookup(query: str) -> str:
        if not index:
            index.append(DocIndex.from_path(docs))
        hits = index[0].lookup(query)
        if not hits:
            close = index[0].suggestions(query)
            return (f"No heading or API name {query!r} in the docs."
                    + (f" Close matches: {', '.join(close)}." if close else ""))
        return "\n\n---\n\n".join(f"{h['heading'] or Path(h['source']).name} ({h['source']}:{h['line']})\n{h['text']}"
                                  for h in hits)

    return StructuredTool.from_function(
        func=doc_lookup, name="doc_lookup", args_schema=DocLookupInput,
        description=("Look up agentpeft's documentation by exact section heading or API/command name; "
                     "returns the matching sections verbatim, code blocks included."))


@hookimpl
def register_tools(register, recipe):
    if recipe is not None and "doc_lookup" not in getattr(recipe, "tools", []):
        return
    if recipe is None or recipe.kb_path is None:
        from ..recipe import get_recipes

        recipe = get_recipes().get("tech-docs")
        if recipe is None or recipe.kb_path is None:
            return
    register(doc_lookup_tool(recipe.kb_path))
