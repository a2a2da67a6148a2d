"""Built-in knowledge-base loaders.

Prose (markdown, text, html, rst, pdf, docx) becomes chunk Documents with metadata ``source``, ``line``,
``heading`` (deepest heading or ""), ``headings`` (outermost first) and ``title``; a section longer
than ``chunk_size`` characters is split with langchain's RecursiveCharacterTextSplitter, and a code
block is never cut (one longer than ``chunk_size`` becomes a chunk of its own).

Question/answer files (csv/tsv, jsonl, yaml) become one Document per pair: ``page_content`` is the
answer, metadata ``source``, ``line``, ``question`` and, when given, ``key``. A pair with an empty
question or answer is left out; a malformed file fails with its file and line.
"""

from __future__ import annotations

import bisect
import csv
import io
import json
import math
import re
import warnings
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Iterable, NamedTuple

import yaml
from langchain_core.documents import Document
from langchain_text_splitters import ExperimentalMarkdownSyntaxTextSplitter, RecursiveCharacterTextSplitter

from ..errors import AgentpeftError
from ..hookspecs import hookimpl
from ..pipeline.ingest import Loader, SkipFile, read_text

Span = tuple[int, int]


# --- chunking shared by the prose loaders -------------------------------------------------------

@lru_cache(maxsize=8)
def _splitter(size: int, overlap: int) -> RecursiveCharacterTextSplitter:
    return RecursiveCharacterTextSplitter(chunk_size=size, chunk_overlap=overlap, add_start_index=True)


def fenced_spans(text: str) -> list[Span]:
    """Offsets of the fenced code blocks (```` ``` ```` or ``~~~`` at the start of a line; an unclosed one runs to the end)."""
    return _fences(text)[0]


def _fences(text: str) -> tuple[list[Span], bool]:
    spans: list[Span] = []
    opened, offset = -1, 0
    for line in text.splitlines(keepends=True):
        if line.startswith(("```", "~~~")):
            if opened < 0:
                opened = offset
            else:
                spans.append((opened, offset + len(line.rstrip("\n"))))
                opened = -1
        offset += len(line)
    if opened >= 0:
        spans.append((opened, len(text)))
    return spans, opened >= 0


def chunk_text(text: str, size: int, overlap: int, atomic: Iterable[Span] = ()) -> list[tuple[int, str]]:
    """``(offset, chunk)`` pieces of ``text`` of at most ``size`` characters; ``atomic`` spans are never cut."""
    if len(text) <= size:
        stripped = text.strip()
        return [(len(text) - len(text.lstrip()), stripped)] if stripped else []
    units: list[tuple[int, int, int | None]] = []  # start, end, prose segment (None for an atomic span)
    pos = 0
    for segment, (a, b) in enumerate([*sorted(atomic), (len(text), len(text))]):
        for doc in _splitter(size, overlap).create_documents([text[pos:a]]):
            start = pos + doc.metadata["start_index"]
            units.append((start, start + len(doc.page_content), segment))
        if b > a:
            units.append((a, b, None))
        pos = max(pos, b)
    chunks: list[Span] = []
    group: int | None = None
    for start, end, seg in units:
        # pieces of one prose segment already fill a chunk (and overlap), so only pack across segments
        if chunks and end - chunks[-1][0] <= size and (seg is None or seg != group):
            chunks[-1] = (chunks[-1][0], end)
        else:
            chunks.append((start, end))
        group = seg
    out = []
    for a, b in chunks:
        piece = text[a:b]
        if piece.strip():
            out.append((a + len(piece) - len(piece.lstrip()), piece.strip()))
    return out


class _Lines:
    """Maps character offsets of a text to 1-based line numbers."""

    def __init__(self, text: str):
        self.newlines = [m.start() for m in re.finditer("\n", text)]

    def __call__(self, offset: int) -> int:
        return bisect.bisect_left(self.newlines, offset) + 1


def _prose(path: Path, title: str, trail: list[str], line: int, chunks: list[tuple[int, str]],
           lines: _Lines | None, **extra) -> list[Document]:
    """Documents for one section's chunks: the first keeps the section's line, later ones their own."""
    docs = []
    for i, (offset, chunk) in enumerate(chunks):
        at = line if i == 0 or lines is None else lines(offset)
        docs.append(Document(page_content=chunk, metadata={
            "source": str(path), "line": at, "heading": trail[-1] if trail else "",
            "headings": list(trail), "title": title, **extra}))
    return docs


# --- markdown --------------------------------------------------------------------------------------

_MD_HEADERS = [("#" * n, f"h{n}") for n in range(1, 7)]
_MD_HEADING = re.compile(r"#{1,6} ")
# A heading's closing hashes ("## Title ##"): matched from the start of a whitespace run only, each run
# taken possessively, so a heading padded with spaces is read once (it was quadratic in their number).
_CLOSING_HASHES = re.compile(r"(?<!\s)\s++#++\s*+$")


def load_markdown(path: Path, chunk_size: int = 1500, chunk_overlap: int = 150) -> list[Document]:
    """Sections split at headings by langchain's Markdown splitter, then chunked; code blocks kept whole."""
    text = read_text(path)
    # the splitter drops the text of an unclosed code block, so close it for the splitter only
    padded = text + "\n```\n" if _fences(text)[1] else text
    parts = ExperimentalMarkdownSyntaxTextSplitter(_MD_HEADERS, strip_headers=False).split_text(padded)
    # the splitter keeps each part verbatim but not its position: find it, and join the parts of a section
    sections: list[list] = []  # [start, end, headers, starts with its heading]
    cursor = 0
    for part in parts:
        start = padded.find(part.page_content, cursor)
        cursor = end = start + len(part.page_content)
        headers = {k: v for k, v in part.metadata.items() if k != "Code"}
        is_heading = "Code" not in part.metadata and _MD_HEADING.match(part.page_content)
        if sections and not is_heading and sections[-1][2] == headers:
            sections[-1][1] = end
        else:
            sections.append([start, end, headers, bool(is_heading)])
    lines = _Lines(text)
    docs: list[Document] = []
    for start, end, headers, is_heading in sections:
        trail = [_CLOSING_HASHES.sub("", headers[k]).strip() for _, k in _MD_HEADERS if k in headers]
        body_start = start
        if is_heading:  # the heading line itself is metadata, not content
            newline = padded.find("\n", start, end)
            body_start = newline + 1 if newline >= 0 else end
        body = text[body_start:min(end, len(text))]
        chunks = [(body_start + o, c) for o, c in chunk_text(body, chunk_size, chunk_overlap, fenced_spans(body))]
        if not chunks:
            continue
        title = trail[0] if "h1" in headers else path.stem
        docs += _prose(path, title, trail, lines(start if is_heading else chunks[0][0]), chunks, lines)
    return docs


# --- plain text, reStructuredText, HTML, PDF -----------------------------------------------------

def load_text(path: Path, chunk_size: int = 1500, chunk_overlap: int = 150) -> list[Document]:
    """Plain text in chunks."""
    text = read_text(path)
    chunks = chunk_text(text, chunk_size, chunk_overlap)
    lines = _Lines(text)
    return _prose(path, path.stem, [], lines(chunks[0][0]) if chunks else 1, chunks, lines)


_RST_ADORNMENT = re.compile(r"""^([!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~])\1+\s*$""")
_RST_CODE = re.compile(r"^(\s*)\.\.\s+(code-block|code|sourcecode)::")


def _rst_literal_spans(lines: list[str], offsets: list[int]) -> list[Span]:
    """Literal blocks (after a paragraph ending in ``::``) and code directives, as offset spans."""
    spans: list[Span] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        directive = _RST_CODE.match(line)
        if directive or (line.rstrip().endswith("::") and not line.lstrip().startswith("..")):
            indent = len(line) - len(line.lstrip())
            j, last = i + 1, None
            while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > indent):
                if lines[j].strip():
                    last = j
                j += 1
            if last is not None:
                first = i if directive else i + 1
                spans.append((offsets[first], offsets[last] + len(lines[last])))
                i = last + 1
                continue
        i += 1
    return spans


def load_rst(path: Path, chunk_size: int = 1500, chunk_overlap: int = 150) -> list[Document]:
    """Sections at underlined (or over- and underlined) titles, levels in order of first use; literal blocks kept whole."""
    text = read_text(path)
    lines = text.split("\n")
    offsets, total = [], 0
    for line in lines:
        offsets.append(total)
        total += len(line) + 1
    literal = _rst_literal_spans(lines, offsets)
    inside = {n for a, b in literal for n in range(bisect.bisect_right(offsets, a) - 1, bisect.bisect_right(offsets, b))}
    styles: list[tuple[str, bool]] = []
    titles: list[tuple[int, int, int, str]] = []  # first line, line after the title, level, title
    i = 0
    while i + 1 < len(lines):
        title, under = lines[i].strip(), lines[i + 1]
        adorned = _RST_ADORNMENT.match(under)
        over = bool(adorned) and i > 0 and lines[i - 1].strip() == under.strip()
        if (i not in inside and title and (over or not lines[i][0].isspace()) and adorned
                and len(under.rstrip()) >= len(title) and not _RST_ADORNMENT.match(lines[i])):
            style = (adorned.group(1), over)
            if style not in styles:
                styles.append(style)
            titles.append((i - 1 if over else i, i + 2, styles.index(style) + 1, title))
            i += 2
            continue
        i += 1
    doc_title = titles[0][3] if titles else path.stem
    to_line = _Lines(text)
    docs: list[Document] = []
    trail: list[str] = []
    bounds = [(0, 0, 0, "")] + titles
    for n, (first, body_from, level, title) in enumerate(bounds):
        if n:
            trail = trail[: level - 1] + [title]
        body_to = bounds[n + 1][0] if n + 1 < len(bounds) else len(lines)
        if body_from >= body_to:
            continue
        start = offsets[body_from]
        end = offsets[body_to - 1] + len(lines[body_to - 1])
        spans = [(max(a, start) - start, min(b, end) - start) for a, b in literal if a < end and b > start]
        chunks = [(start + o, c) for o, c in chunk_text(text[start:end], chunk_size, chunk_overlap, spans)]
        docs += _prose(path, doc_title, trail, first + 1 if n else to_line(chunks[0][0]) if chunks else 1,
                       chunks, to_line)
    return docs


_HTML_BLOCKS = {"address", "article", "aside", "blockquote", "dd", "div", "dl", "dt", "figcaption", "figure",
                "footer", "form", "header", "hr", "li", "main", "nav", "ol", "p", "section", "table", "tr",
                "td", "th", "ul"}
_HTML_HEADINGS = ("h1", "h2", "h3", "h4", "h5", "h6")


def _tidy(prose: str) -> str:
    lines = [re.sub(r"[ \t\f\v]+", " ", line).strip() for line in prose.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def load_html(path: Path, chunk_size: int = 1500, chunk_overlap: int = 150) -> list[Document]:
    """Sections at ``<h1>``..``<h6>``; ``<pre>`` blocks kept whole (as fenced code); scripts and styles dropped."""
    from bs4 import BeautifulSoup, NavigableString, Tag
    from bs4.element import Comment, Declaration, Doctype, ProcessingInstruction

    text = read_text(path)
    try:
        with warnings.catch_warnings():  # bs4 warns when markup "looks like" a URL or XML: noise here
            warnings.simplefilter("ignore")
            soup = BeautifulSoup(text, "html.parser")
    except Exception as exc:  # html.parser rejects some malformed markup with assorted exception types
        raise AgentpeftError(f"{path}: cannot parse HTML ({type(exc).__name__}: {exc}); fix or remove the file") from None
    title = soup.title.get_text(" ", strip=True) if soup.title else ""
    for tag in soup(["script", "style", "noscript", "template", "head", "title"]):
        tag.decompose()
    root = _html_content(soup)
    sections: list[tuple[int, list[str], list[str]]] = [(1, [], [])]  # line, trail, text parts
    trail: list[str] = []
    skip_inside: Tag | None = None
    for el in root.descendants:
        if skip_inside is not None:
            if _within(el, skip_inside):
                continue
            skip_inside = None
        if isinstance(el, Tag):
            if el.name in _HTML_HEADINGS:
                level = int(el.name[1])
                trail = trail[: level - 1] + [el.get_text(" ", strip=True)]
                sections.append((el.sourceline or sections[-1][0], list(trail), []))
                skip_inside = el
            elif el.name == "pre":
                code = el.get_text().strip("\n")
                sections[-1][2].append(f"\n\n```\n{code}\n```\n\n")
                skip_inside = el
            elif el.name == "br":
                sections[-1][2].append("\n")
            elif el.name in _HTML_BLOCKS:
                sections[-1][2].append("\n\n")
        elif isinstance(el, NavigableString) and not isinstance(el, (Comment, Declaration, Doctype, ProcessingInstruction)):
            sections[-1][2].append(re.sub(r"\s+", " ", str(el)))
    title = title or next((t[0] for _, t, _ in sections if t), path.stem)
    docs: list[Document] = []
    for line, section_trail, parts in sections:
        body = "".join(p if p.startswith("\n\n```") else _tidy(p) for p in _merge_prose(parts)).strip()
        chunks = chunk_text(body, chunk_size, chunk_overlap, fenced_spans(body))
        docs += _prose(path, title, section_trail, line, chunks, None)
    return docs


#: Page furniture that is not the page's content: menus, banners, footers, cookie notices, forms.
_HTML_CHROME = ("nav", "footer", "aside", "form", "button", "dialog", "svg", "iframe")
_HTML_CHROME_ROLES = {"navigation", "banner", "contentinfo", "search", "complementary", "dialog", "alert"}
_HTML_CHROME_NAMES = re.compile(r"(?:^|[-_ ])(?:nav|navbar|menu|breadcrumbs?|cookies?|cookie-banner|consent|footer|"
                                r"sidebar|skip-link|share|social|newsletter|banner)(?:$|[-_ ])", re.I)


def _html_content(soup):
    """The page's content: its ``<main>`` (or single ``<article>``) without navigation, banners, footers,
    sidebars and cookie notices, which every page of a help center repeats."""
    root = soup.find("main") or soup.find(attrs={"role": "main"})
    if root is None:
        articles = soup.find_all("article")
        root = articles[0] if len(articles) == 1 else (soup.body or soup)
    chrome = [el for el in root.find_all(True) if el.name in _HTML_CHROME
              or (el.get("role") or "").lower() in _HTML_CHROME_ROLES
              or _HTML_CHROME_NAMES.search(" ".join([el.get("id") or "", *(el.get("class") or [])]))
              or (el.name == "header" and not el.find(_HTML_HEADINGS))]
    for el in chrome:
        if not el.decomposed:
            el.decompose()
    return root


def _within(el, ancestor) -> bool:
    parent = el.parent
    while parent is not None:
        if parent is ancestor:
            return True
        parent = parent.parent
    return False


def _merge_prose(parts: list[str]) -> list[str]:
    """Join consecutive prose parts so each can be tidied as one; fenced ``<pre>`` parts stay apart."""
    merged: list[str] = []
    for part in parts:
        if merged and not part.startswith("\n\n```") and not merged[-1].startswith("\n\n```"):
            merged[-1] += part
        else:
            merged.append(part)
    return merged


# --- PDF ---------------------------------------------------------------------------------------------

class _PdfLine(NamedTuple):
    text: str  # without trailing spaces
    page: int  # 1-based
    line: int  # 1-based, within the page's extracted text
    size: float  # dominant font size in points (to the half point); 0 when unknown
    bold: bool  # every visible character in a bold font
    y: float | None  # baseline of the line's first text, in page space


_PDF_BOLD = re.compile(r"bold|black|heavy|demi|semibold|extrabold|ultrabold", re.I)


def _pdf_bold(font) -> bool:
    """Whether a font dictionary names a bold face (or its descriptor says so: weight, ForceBold flag)."""
    try:
        font = font.get_object() if hasattr(font, "get_object") else font
        if not hasattr(font, "get"):
            return False
        if _PDF_BOLD.search(str(font.get("/BaseFont") or "")):
            return True
        descriptor = font.get("/FontDescriptor")
        if descriptor is None and font.get("/DescendantFonts"):  # a Type0 font describes its face below
            descendant = font["/DescendantFonts"].get_object()[0].get_object()
            if _PDF_BOLD.search(str(descendant.get("/BaseFont") or "")):
                return True
            descriptor = descendant.get("/FontDescriptor")
        descriptor = descriptor.get_object() if descriptor is not None else None
        if descriptor is None:
            return False
        return float(descriptor.get("/FontWeight", 0) or 0) >= 600 or bool(int(descriptor.get("/Flags", 0) or 0) & 1 << 18)
    except Exception:  # a damaged font dictionary only costs the boldness hint
        return False


def _pdf_page_lines(page, number: int) -> list[_PdfLine]:
    """The page's text lines with the font size and boldness pypdf reports for each piece of text.

    The size is the font size (``Tf``) times the vertical scale of the text and graphics matrices, so a
    PDF that sets ``1 Tf`` and scales with ``Tm`` reads the same as one that sets ``12 Tf``. When the
    pieces do not add up to the page's text, the lines carry no size (size 0) rather than wrong ones.
    """
    pieces: list[tuple[str, float, bool, float | None]] = []
    bold_fonts: dict[int, bool] = {}

    def visit(text, cm, tm, font, font_size):
        if not text:
            return
        size, y = 0.0, None
        try:
            a, b, c, d, e, f = (float(v) for v in tm)
            a2, b2, c2, d2, e2, f2 = (float(v) for v in cm) if cm else (1.0, 0.0, 0.0, 1.0, 0.0, 0.0)
            size = float(font_size or 0) * math.hypot(c * a2 + d * c2, c * b2 + d * d2)
            y = e * b2 + f * d2 + f2
        except (TypeError, ValueError):
            pass
        key = id(font)
        if key not in bold_fonts:
            bold_fonts[key] = _pdf_bold(font) if font is not None else False
        pieces.append((text, round(size * 2) / 2, bold_fonts[key], y))

    plain = (page.extract_text(visitor_text=visit) or "").replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    joined = "".join(p[0] for p in pieces).replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    if re.sub(r"\s+", "", joined) != re.sub(r"\s+", "", plain):
        return [_PdfLine(text.rstrip(), number, i, 0.0, False, None) for i, text in enumerate(plain.split("\n"), 1)]
    lines: list[_PdfLine] = []
    text, sizes, bold, y = "", Counter(), True, None

    def close():
        nonlocal text, sizes, bold, y
        size = sizes.most_common(1)[0][0] if sizes else 0.0
        lines.append(_PdfLine(text.rstrip(), number, len(lines) + 1, size, bold and bool(sizes), y))
        text, sizes, bold, y = "", Counter(), True, None

    for piece, size, is_bold, at in pieces:
        parts = piece.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "").split("\n")
        for i, part in enumerate(parts):
            if i:
                close()
            visible = len(part) - part.count(" ") - part.count("\t")
            if visible:
                text += part
                sizes[size] += visible
                bold = bold and is_bold
                y = at if y is None else y
            else:
                text += part
    if text.strip() or not lines:
        close()
    return lines


def _pdf_furniture(pages: list[list[_PdfLine]]) -> set[tuple[int, int]]:
    """``(page, line)`` of running headers and footers, in a document of three pages or more.

    Such a line is among the first or last three of its page and recurs on most pages: the same text,
    or the same text but for a number that moves with the page number ("Page 3 of 9", "- 12 -").
    """
    if len(pages) < 3:
        return set()
    groups: dict[str, list[_PdfLine]] = {}
    for lines in pages:
        texts = [line for line in lines if line.text.strip()]
        edges: dict[str, _PdfLine] = {}
        for line in texts[:3] + texts[-3:]:
            edges.setdefault(re.sub(r"\d+", "#", " ".join(line.text.lower().split())), line)
        for key, line in edges.items():
            groups.setdefault(key, []).append(line)
    drop: set[tuple[int, int]] = set()
    for found in groups.values():
        if len(found) < 3 or len(found) <= len(pages) / 2:
            continue
        numbers = [[int(n[-9:]) for n in re.findall(r"\d+", line.text)] for line in found]
        static = all(n == numbers[0] for n in numbers)
        if static or any(len({n[k] - line.page for n, line in zip(numbers, found)}) == 1 for k in range(len(numbers[0]))):
            drop.update((line.page, line.line) for line in found)
    return drop


def _pdf_outline_headings(reader, lines: list[_PdfLine]) -> dict[int, tuple[int, str, int]]:
    """Headings from the document outline (bookmarks): ``{line index: (level, heading, lines it takes)}``.

    Each entry is looked for on its destination page as a line (or up to three wrapped lines) reading
    like its title; that text is the heading and leaves the body. An entry not found there starts at
    the first line at or below its destination's top, else at the top of its page.
    """
    entries: list[tuple[int, str, int, float | None]] = []  # level, title, 0-based page, top

    def walk(items, level):
        for item in items:
            if isinstance(item, list):
                walk(item, level + 1)
                continue
            try:
                number = reader.get_destination_page_number(item)
                title = " ".join(str(item.title or "").split())
                top = item.top
                top = float(top) if isinstance(top, (int, float)) else None
            except Exception:  # a broken or remote destination: the entry is left out
                continue
            if number is not None and number >= 0 and title:
                entries.append((min(level, 6), title, number, top))

    try:
        walk(reader.outline, 1)
    except Exception:  # an unreadable outline is as good as none
        return {}
    page_of = [line.page for line in lines]
    placed: list[tuple[int, int, int, str, int]] = []  # line index, order, level, title, lines taken
    for order, (level, title, number, top) in enumerate(entries):
        start = bisect.bisect_left(page_of, number + 1)  # the page's first line, or the next page's
        if start == len(lines):
            continue
        want = _pdf_norm(title)
        found = None
        i = start
        while found is None and i < len(lines) and lines[i].page == number + 1:
            seen = ""
            for k in range(3):
                if i + k >= len(lines) or lines[i + k].page != number + 1:
                    break
                seen += _pdf_norm(lines[i + k].text)
                if not seen or not want.startswith(seen):
                    break
                if seen == want:
                    found = (i, k + 1)
                    break
            i += 1
        if found is None:
            below = next((j for j in range(start, len(lines)) if lines[j].page == number + 1
                          and top is not None and lines[j].y is not None and lines[j].y <= top + 2), None)
            found = (below if below is not None else start, 0)
        placed.append((found[0], order, level, title, found[1]))
    headings: dict[int, tuple[int, str, int]] = {}
    for index, _, level, title, taken in sorted(placed):
        while index in headings:  # two entries at one place: the later one follows the earlier
            index += 1
        headings[index] = (level, title, taken)
    return headings


def _pdf_norm(text: str) -> str:
    return re.sub(r"\W+", "", text.lower())


def _pdf_font_headings(lines: list[_PdfLine]) -> dict[int, tuple[int, str, int]]:
    """Headings from font sizes: ``{line index: (level, heading, lines it takes)}``, empty when none.

    The body size is the size most characters are set in. A short line set clearly larger (by a tenth
    and at least a point) is a heading, and so is a short line that is bold at the body size while the
    lines around it are not. Up to three consecutive lines in one style are one wrapped heading; a longer
    run is large text, not a heading. Levels follow the distinct sizes, largest first, bold body text
    last; a largest size used by one heading on the first page is the document's title and shares level
    1 with the next size, as Word's Title style does.
    """
    sizes: Counter = Counter()
    for line in lines:
        if line.size:
            sizes[line.size] += len(line.text.strip())
    if not sizes:
        return {}
    body = sizes.most_common(1)[0][0]

    def style(i: int) -> tuple[float, bool] | None:
        line = lines[i]
        text = line.text.strip()
        if not line.size or not re.search(r"[^\W\d_]", text) or len(text) > 150 or len(text.split()) > 20:
            return None
        if line.size >= body + max(1.0, body / 10):
            return (line.size, False)
        if line.bold and abs(line.size - body) <= 0.5 and not re.search(r"[.,;]$", text):
            return (body, True)
        return None

    def bold_text(i: int) -> bool:  # a bold line at the body size: a bold paragraph's, if next to another
        return (0 <= i < len(lines) and lines[i].bold and abs(lines[i].size - body) <= 0.5
                and bool(lines[i].text.strip()))

    runs: list[tuple[int, int, tuple[float, bool]]] = []  # first line index, line count, style
    i = 0
    while i < len(lines):
        mark = style(i)
        if mark is None:
            i += 1
            continue
        j = i + 1
        while (j < len(lines) and lines[j].page == lines[i].page and style(j) == mark
               and lines[j].bold == lines[i].bold):
            j += 1
        count = j - i
        alone = not mark[1] or count == 1 and not bold_text(i - 1) and not bold_text(j)
        if count <= 3 and alone:
            runs.append((i, count, mark))
        i = j
    if not runs:
        return {}
    order = sorted({mark for _, _, mark in runs}, key=lambda m: (m[1], -m[0]))
    level = {mark: n + 1 for n, mark in enumerate(order)}
    top = order[0]
    if len(order) > 1 and not top[1]:
        uses = [(i, n) for i, n, mark in runs if mark == top]
        if len(uses) == 1 and lines[uses[0][0]].page == lines[0].page:
            level = {mark: max(1, n - 1) for mark, n in level.items()}
    return {i: (min(level[mark], 6), " ".join(" ".join(lines[k].text.split()) for k in range(i, i + n)), n)
            for i, n, mark in runs}


def _pdf_sections(lines: list[_PdfLine], headings: dict[int, tuple[int, str, int]], by_page: bool):
    """``(trail, first line, body lines)`` for each section; without headings, ``by_page`` splits at pages."""
    sections: list[tuple[list[str], _PdfLine | None, list[_PdfLine]]] = [([], None, [])]
    trail: list[str] = []
    skip = 0
    for i, line in enumerate(lines):
        if i in headings:
            level, heading, skip = headings[i]
            trail = trail[: level - 1] + [heading]
            sections.append((list(trail), line, []))
        elif by_page and sections[-1][2] and sections[-1][2][-1].page != line.page:
            sections.append(([], None, []))
        if skip:
            skip -= 1
            continue
        sections[-1][2].append(line)
    return sections


def load_pdf(path: Path, chunk_size: int = 1500, chunk_overlap: int = 150) -> list[Document]:
    """Sections at the PDF's headings, chunked; metadata ``page`` (1-based) and ``line`` (within that page).

    Headings come from the outline (bookmarks) when the PDF has one, else from font sizes and
    boldness (see :func:`_pdf_font_headings`). A section runs on across page breaks; each chunk has the
    page and line where it starts, the first one those of its heading. Running headers and footers
    are dropped. A PDF without usable headings (one font size, no font information) is chunked page
    by page, as plain text.
    """
    from pypdf import PdfReader

    try:
        if path.stat().st_size == 0:
            raise SkipFile(path, "empty")
        reader = PdfReader(path)
        if reader.is_encrypted and not reader.decrypt(""):
            raise SkipFile(path, "encrypted PDF")
        pages = [_pdf_page_lines(page, number) for number, page in enumerate(reader.pages, 1)]
        meta_title = reader.metadata.title if reader.metadata else None
    except SkipFile:
        raise
    except OSError as exc:
        raise SkipFile(path, f"unreadable ({exc.strerror or exc})") from None
    except Exception as exc:  # pypdf raises many exception types on a corrupt file
        raise SkipFile(path, f"not a readable PDF ({type(exc).__name__})") from None
    if pages and not any(line.text.strip() for lines in pages for line in lines):
        raise SkipFile(path, f"no text layer in its {len(pages)} page(s) (a scanned PDF needs OCR first)")
    furniture = _pdf_furniture(pages)
    lines = [line for page in pages for line in page if (line.page, line.line) not in furniture]
    headings = _pdf_outline_headings(reader, lines) or _pdf_font_headings(lines)
    title = str(meta_title).strip() if meta_title else ""
    title = title or next((heading for _, heading, _ in headings.values()), path.stem)
    docs: list[Document] = []
    for trail, first, body_lines in _pdf_sections(lines, headings, by_page=not headings):
        starts, offset = [], 0
        for line in body_lines:
            starts.append(offset)
            offset += len(line.text) + 1
        body = "\n".join(line.text for line in body_lines)
        for n, (at, chunk) in enumerate(chunk_text(body, chunk_size, chunk_overlap)):
            where = first if n == 0 and first is not None else body_lines[bisect.bisect_right(starts, at) - 1]
            docs.append(Document(page_content=chunk, metadata={
                "source": str(path), "line": where.line, "heading": trail[-1] if trail else "",
                "headings": list(trail), "title": title, "page": where.page}))
    return docs


# --- Word documents ----------------------------------------------------------------------------------

_DOCX_HEADING = re.compile(r"^(?:Heading|Überschrift|Titre|Titolo|Título)\s*(\d)$", re.I)


def load_docx(path: Path, chunk_size: int = 1500, chunk_overlap: int = 150) -> list[Document]:
    """Sections at Word's heading styles (python-docx), chunked; list items and table rows one line each.

    ``line`` counts paragraphs (and table rows) from the top of the document.
    """
    import docx
    from docx.table import Table

    try:
        if path.stat().st_size == 0:
            raise SkipFile(path, "empty")
        document = docx.Document(str(path))
        blocks = list(document.iter_inner_content())
        core_title = (document.core_properties.title or "").strip()
    except SkipFile:
        raise
    except OSError as exc:
        raise SkipFile(path, f"unreadable ({exc.strerror or exc})") from None
    except Exception as exc:  # python-docx raises assorted types on a damaged or foreign file
        raise SkipFile(path, f"not a readable DOCX ({type(exc).__name__})") from None
    sections: list[tuple[int, list[str], list[str]]] = [(1, [], [])]  # line, trail, lines of text
    trail: list[str] = []
    title = core_title
    number = 0
    for block in blocks:
        if isinstance(block, Table):
            for row in block.rows:
                number += 1
                cells = list(dict.fromkeys(c.text.strip() for c in row.cells if c.text.strip()))
                if cells:
                    sections[-1][2].append(" | ".join(cells))
            sections[-1][2].append("")
            continue
        number += 1
        text = block.text.strip()
        style = (block.style.name if block.style is not None else "") or ""
        level = 1 if style == "Title" else int(m.group(1)) if (m := _DOCX_HEADING.match(style)) else 0
        if level and text:
            title = title or text
            trail = trail[: level - 1] + [text]
            sections.append((number, list(trail), []))
        elif text:
            bullet = "- " if "List" in style or block._p.pPr is not None and block._p.pPr.numPr is not None else ""
            sections[-1][2].append(bullet + text)
            if not bullet:
                sections[-1][2].append("")
    docs: list[Document] = []
    for line, section_trail, lines in sections:
        body = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
        docs += _prose(path, title or path.stem, section_trail, line, chunk_text(body, chunk_size, chunk_overlap), None)
    return docs


# --- question/answer files -------------------------------------------------------------------------

def _pair(path: Path, line: int, question: str, answer: str, key: str | None = None, **extra) -> Document | None:
    question, answer = question.strip(), answer.strip()
    if not question or not answer:
        return None
    metadata = {"source": str(path), "line": line, "question": question, **extra}
    if key and key.strip():
        metadata["key"] = key.strip()
    return Document(page_content=answer, metadata=metadata)


def load_csv(path: Path, question: str = "question", answer: str = "answer", key: str = "key",
             delimiter: str | None = None) -> list[Document]:
    """One pair per row of a CSV/TSV file with a header row (column names set by the recipe's loader_options)."""
    text = read_text(path)
    delim = delimiter or ("\t" if path.suffix.lower() == ".tsv" else ",")
    rows = csv.reader(io.StringIO(text, newline=""), delimiter=delim, strict=True)
    docs: list[Document] = []
    start = 1
    try:
        header = [h.strip() for h in next(rows)]
        missing = [c for c in (question, answer) if c not in header]
        if missing:
            raise AgentpeftError(
                f"{path}:1: no column {missing[0]!r} (columns: {header}); name the question and answer columns "
                f"with data.loader_options.csv: {{question: ..., answer: ...}}"
            )
        qi, ai = header.index(question), header.index(answer)
        ki = header.index(key) if key in header else None
        start = rows.line_num + 1
        for row in rows:
            at, start = start, rows.line_num + 1
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise AgentpeftError(
                    f"{path}:{at}: {len(row)} fields where the header has {len(header)}; "
                    f"quote fields that contain {delim!r} or line breaks"
                )
            doc = _pair(path, at, row[qi], row[ai], row[ki] if ki is not None else None)
            if doc:
                docs.append(doc)
    except csv.Error as exc:
        raise AgentpeftError(f"{path}:{rows.line_num or start}: malformed CSV ({exc}); fix the quoting") from None
    except StopIteration:
        return []
    return docs


def _field(path: Path, line: int, record: dict, name: str, required: bool) -> str | None:
    value = record.get(name)
    if value is None:
        if required:
            raise AgentpeftError(
                f"{path}:{line}: no {name!r} field (fields: {sorted(record)}); "
                "name the fields with data.loader_options.jsonl: {question: ..., answer: ...}"
            )
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise AgentpeftError(f"{path}:{line}: field {name!r} must be text, not {type(value).__name__}")
    return str(value)


def load_jsonl(path: Path, question: str = "question", answer: str = "answer", key: str = "key") -> list[Document]:
    """One pair per line of a JSON Lines file (each line an object with question and answer fields)."""
    docs: list[Document] = []
    for number, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AgentpeftError(f"{path}:{number}: invalid JSON ({exc.msg}, column {exc.colno}); "
                                 "each line must be one JSON object") from None
        except RecursionError:
            raise AgentpeftError(f"{path}:{number}: JSON nested too deeply") from None
        if not isinstance(record, dict):
            raise AgentpeftError(f"{path}:{number}: a {type(record).__name__} where a JSON object was expected")
        doc = _pair(path, number, _field(path, number, record, question, True),
                    _field(path, number, record, answer, True), _field(path, number, record, key, False))
        if doc:
            docs.append(doc)
    return docs


def _mapping(path: Path, node: yaml.Node, what: str) -> dict[str, yaml.Node]:
    if not isinstance(node, yaml.MappingNode):
        raise AgentpeftError(f"{path}:{node.start_mark.line + 1}: {what} must be a mapping")
    return {k.value: v for k, v in node.value if isinstance(k, yaml.ScalarNode)}


def _scalar(path: Path, node: yaml.Node | None, what: str) -> str:
    if node is None or node.tag.endswith(":null"):
        return ""
    if not isinstance(node, yaml.ScalarNode):
        raise AgentpeftError(f"{path}:{node.start_mark.line + 1}: {what} must be text")
    return node.value


#: Most aliases (``*name``) a YAML file may use: each one repeats a whole node, so a few nested ones
#: expand a small file into millions of pairs ("billion laughs").
MAX_YAML_ALIASES = 16


class _FewAliasesLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a document with more than MAX_YAML_ALIASES aliases."""

    aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_YAML_ALIASES:
                mark = self.peek_event().start_mark
                raise AgentpeftError(f"{self.name}:{mark.line + 1}: more than {MAX_YAML_ALIASES} YAML aliases (*name), "
                                     "which can expand a small file without bound; write the values out")
        return super().compose_node(parent, index)


def load_yaml(path: Path) -> list[Document]:
    """InstructLab-style ``qna.yaml``: ``seed_examples`` of question/answer pairs (flat, or under a ``context``).

    A file with more than MAX_YAML_ALIASES aliases is refused."""
    text = read_text(path)
    try:
        loader = _FewAliasesLoader(text)
        loader.name = str(path)
        try:
            root = loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise AgentpeftError(f"{path}:{mark.line + 1 if mark else 1}: invalid YAML ({exc.problem or exc.context}); "
                             "fix the file") from None
    except yaml.YAMLError as exc:
        raise AgentpeftError(f"{path}: invalid YAML ({exc}); fix the file") from None
    except RecursionError:
        raise AgentpeftError(f"{path}: YAML nested too deeply") from None
    if root is None:  # comments only
        return []
    hint = "an InstructLab qna.yaml holds 'seed_examples:' with 'question:' and 'answer:' items"
    seeds = _mapping(path, root, "the file").get("seed_examples")
    if not isinstance(seeds, yaml.SequenceNode):
        line = (seeds if seeds is not None else root).start_mark.line + 1
        raise AgentpeftError(f"{path}:{line}: no 'seed_examples' list; {hint}")
    docs: list[Document] = []
    for example in seeds.value:
        fields = _mapping(path, example, "a seed example")
        context = _scalar(path, fields.get("context"), "context").strip()
        items = fields.get("questions_and_answers")
        if items is not None and not isinstance(items, yaml.SequenceNode):
            raise AgentpeftError(f"{path}:{items.start_mark.line + 1}: questions_and_answers must be a list")
        for item in items.value if items is not None else [example]:
            pair = _mapping(path, item, "a question/answer item")
            line = item.start_mark.line + 1
            for name in ("question", "answer"):
                if name not in pair:
                    raise AgentpeftError(f"{path}:{line}: item has no '{name}'; {hint}")
            extra = {"context": context} if context else {}
            doc = _pair(path, line, _scalar(path, pair["question"], "question"),
                        _scalar(path, pair["answer"], "answer"), _scalar(path, pair.get("key"), "key"), **extra)
            if doc:
                docs.append(doc)
    return docs


@hookimpl
def register_loaders(register):
    register(Loader("markdown", (".md", ".markdown"), load_markdown))
    register(Loader("text", (".txt",), load_text))
    register(Loader("html", (".html", ".htm"), load_html))
    register(Loader("rst", (".rst",), load_rst))
    register(Loader("pdf", (".pdf",), load_pdf))
    register(Loader("docx", (".docx",), load_docx))
    register(Loader("csv", (".csv", ".tsv"), load_csv))
    register(Loader("jsonl", (".jsonl",), load_jsonl))
    register(Loader("yaml", (".yaml", ".yml"), load_yaml))
