"""Ingestion: every loader on small files, folders, metadata, code blocks, bad input and fuzzing."""

from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentpeft import plugins
from agentpeft.errors import AgentpeftError
from agentpeft.hookspecs import hookimpl
from agentpeft.pipeline.ingest import Loader, get_loaders, ingest
from agentpeft.progress import set_enabled
from agentpeft.recipe import DataConfig

MEDQUAD = Path(__file__).resolve().parents[2] / "shared" / "data" / "medquad"
LOADERS = ["markdown", "text", "html", "rst", "pdf", "csv", "jsonl", "yaml", "medquad"]
SUFFIX = {"markdown": ".md", "text": ".txt", "html": ".html", "rst": ".rst", "pdf": ".pdf", "csv": ".csv",
          "jsonl": ".jsonl", "yaml": ".yaml", "medquad": ".xml"}


@pytest.fixture(autouse=True)
def _quiet():
    set_enabled(False)
    yield
    set_enabled(True)


def write(folder: Path, name: str, text: str | bytes) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def make_pdf(pages: list[list], title: str | None = None, outline: list[tuple[int, str, int]] = (),
             scaled: bool = False) -> bytes:
    """A minimal valid PDF, one page per list and one text line per entry, 16 points apart.

    An entry is a string (12 pt Helvetica) or ``(text, size, bold)``; ``scaled`` sets each size with
    ``1 Tf`` and a scaled text matrix instead of ``Tf``. ``outline`` holds ``(level, title, page index)``
    bookmarks (levels 1 and 2), each pointing at the top of its page.
    """
    def pdf_string(text: str) -> str:
        return "(" + text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") + ")"

    first_page = 5
    objs = ["<< /Type /Catalog /Pages 2 0 R%s >>" % (f" /Outlines {first_page + 2 * len(pages)} 0 R" if outline else ""),
            f"<< /Type /Pages /Kids [{' '.join(f'{first_page + 2 * i} 0 R' for i in range(len(pages)))}] /Count {len(pages)} >>",
            "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
            "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica-Bold >>"]
    for i, lines in enumerate(pages):
        ops = []
        for n, line in enumerate(lines):
            text, size, bold = (line, 12, False) if isinstance(line, str) else line
            font = "/F2" if bold else "/F1"
            y = 740 - 16 * n
            place = f"{font} 1 Tf {size} 0 0 {size} 72 {y} Tm" if scaled else f"{font} {size} Tf 1 0 0 1 72 {y} Tm"
            ops.append(f"BT {place} {pdf_string(text)} Tj ET")
        stream = "\n".join(ops)
        objs.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
                    f"/Resources << /Font << /F1 3 0 R /F2 4 0 R >> >> /Contents {first_page + 1 + 2 * i} 0 R >>")
        objs.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
    if outline:
        root = len(objs) + 1
        items = list(range(root + 1, root + 1 + len(outline)))
        parents = []  # each entry's parent object: the root, or the level-1 entry above a level-2 one
        for level, _, _ in outline:
            parents.append(root if level == 1 else next(items[j] for j in range(len(parents) - 1, -1, -1)
                                                         if outline[j][0] == 1))
        def kids(parent):
            return [items[j] for j in range(len(outline)) if parents[j] == parent]
        top = kids(root)
        objs.append(f"<< /Type /Outlines /First {top[0]} 0 R /Last {top[-1]} 0 R /Count {len(outline)} >>")
        for j, (level, heading, page) in enumerate(outline):
            siblings, children = kids(parents[j]), kids(items[j])
            k = siblings.index(items[j])
            links = (f" /Prev {siblings[k - 1]} 0 R" if k else "") + (
                f" /Next {siblings[k + 1]} 0 R" if k + 1 < len(siblings) else "") + (
                f" /First {children[0]} 0 R /Last {children[-1]} 0 R /Count {len(children)}" if children else "")
            objs.append(f"<< /Title {pdf_string(heading)} /Parent {parents[j]} 0 R{links} "
                        f"/Dest [{first_page + 2 * page} 0 R /XYZ 0 792 0] >>")
    if title:
        objs.append(f"<< /Title ({title}) >>")
    out, offsets = b"%PDF-1.4\n", []
    for number, obj in enumerate(objs, 1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n{obj}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    info = f" /Info {len(objs)} 0 R" if title else ""
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R{info} >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return out


# --- each loader ---------------------------------------------------------------------------------

MARKDOWN = """Intro before any heading.

# Guide

## Install

Run the installer.

```python
# not a heading: inside a code block
def main():

    return 1
```

After the code.

### Deep ##

Deep text.

---

More deep text after a rule.

## Learn C#

Sharp.

## Empty
"""


def test_markdown_sections_metadata_and_code_blocks(tmp_path):
    path = write(tmp_path, "guide.md", MARKDOWN)
    docs = ingest(path, ["markdown"])
    by_heading = {d.metadata["heading"]: d for d in docs}
    assert [d.metadata["heading"] for d in docs] == ["", "Install", "Deep", "Learn C#"]
    assert docs[0].metadata == {"source": str(path), "line": 1, "heading": "", "headings": [], "title": "guide"}
    install = by_heading["Install"]
    assert install.metadata["headings"] == ["Guide", "Install"] and install.metadata["title"] == "Guide"
    assert install.metadata["line"] == 5
    assert "def main():\n\n    return 1\n```" in install.page_content  # indentation and blank lines kept
    assert install.page_content.endswith("After the code.")
    deep = by_heading["Deep"]
    assert deep.metadata["headings"] == ["Guide", "Install", "Deep"] and deep.metadata["line"] == 18
    assert "Deep text." in deep.page_content and "More deep text after a rule." in deep.page_content


def test_markdown_long_section_is_chunked_and_code_block_stays_whole(tmp_path):
    prose = " ".join(f"Sentence number {i} explains the setting." for i in range(40))
    code = "```bash\n" + "\n".join(f"echo step {i}  # keep" for i in range(30)) + "\n```"
    write(tmp_path, "long.md", f"# Title\n\n## Setup\n\n{prose}\n\n{code}\n\n{prose}\n")
    docs = ingest(tmp_path, ["markdown"], chunk_size=300, chunk_overlap=30)
    assert len(docs) > 5 and {d.metadata["heading"] for d in docs} == {"Setup"}
    holding = [d for d in docs if "echo step 0" in d.page_content]
    assert len(holding) == 1 and code in holding[0].page_content
    assert not any("```" in d.page_content for d in docs if d is not holding[0])
    assert all(len(d.page_content) <= 300 for d in docs if d is not holding[0])
    lines = [d.metadata["line"] for d in docs]
    assert lines[0] == 3 and lines == sorted(lines) and lines[-1] > 3
    text = (tmp_path / "long.md").read_text().split("\n")
    for doc in docs[1:]:  # a later chunk's line is where its text starts
        assert doc.page_content.split("\n")[0][:20] in text[doc.metadata["line"] - 1]


def test_markdown_unclosed_code_block_is_kept(tmp_path):
    write(tmp_path, "open.md", "## Snippet\n\nText.\n\n```\ncode line\n# still code\n")
    [doc] = ingest(tmp_path, ["markdown"])
    assert doc.metadata["heading"] == "Snippet"
    assert "code line\n# still code" in doc.page_content


def test_text_loader_chunks_with_lines(tmp_path):
    paragraphs = "\n\n".join(f"Paragraph {i}. " + "word " * 40 for i in range(10))
    path = write(tmp_path, "notes.txt", "\n\n" + paragraphs)
    docs = ingest(path, ["text"], chunk_size=400, chunk_overlap=0)
    assert len(docs) > 2
    assert docs[0].metadata == {"source": str(path), "line": 3, "heading": "", "headings": [], "title": "notes"}
    assert all(len(d.page_content) <= 400 for d in docs)
    assert docs[1].metadata["line"] > 3


HTML = """<!doctype html>
<html><head><title>Lamp manual</title><style>p {color: red}</style></head>
<body>
<p>Welcome   to the
manual.</p>
<h1>Lamp</h1>
<h2>Setup</h2>
<p>Plug it in.</p><script>alert("no")</script>
<pre>
def on():
    return True
</pre>
<h2>Care</h2>
<ul><li>Dust weekly.</li><li>No water.</li></ul>
</body></html>
"""


def test_html_headings_become_sections(tmp_path):
    path = write(tmp_path, "manual.html", HTML)
    docs = ingest(path, ["html"])
    assert [d.metadata["heading"] for d in docs] == ["", "Setup", "Care"]
    assert docs[0].page_content == "Welcome to the manual."
    setup, care = docs[1], docs[2]
    assert setup.metadata["headings"] == ["Lamp", "Setup"] and setup.metadata["title"] == "Lamp manual"
    assert setup.metadata["line"] == 7
    assert "def on():\n    return True" in setup.page_content and "alert" not in setup.page_content
    assert care.page_content == "Dust weekly.\n\nNo water."


RST = """=========
 Project
=========

Intro text.

Usage
=====

Call it like this::

    run(
        fast=True)

Options
-------

.. code-block:: python

    x = 1

      y = 2

Some option text.

Other
=====

Done.
"""


def test_rst_titles_and_literal_blocks(tmp_path):
    path = write(tmp_path, "doc.rst", RST)
    docs = ingest(path, ["rst"])
    assert [d.metadata["headings"] for d in docs] == [["Project"], ["Project", "Usage"],
                                                      ["Project", "Usage", "Options"], ["Project", "Other"]]
    assert [d.metadata["line"] for d in docs] == [1, 7, 15, 26]
    assert all(d.metadata["title"] == "Project" for d in docs)
    assert "run(\n        fast=True)" in docs[1].page_content
    assert ".. code-block:: python\n\n    x = 1\n\n      y = 2" in docs[2].page_content


def test_rst_literal_block_is_never_cut(tmp_path):
    block = "\n".join(f"    line_{i} = {i}" for i in range(40))
    write(tmp_path, "long.rst", "Title\n=====\n\n" + "Some words here. " * 30 + "\n\nExample::\n\n" + block + "\n\nEnd.\n")
    docs = ingest(tmp_path, ["rst"], chunk_size=200, chunk_overlap=20)
    holding = [d for d in docs if "line_0 = 0" in d.page_content]
    assert len(holding) == 1 and "line_39 = 39" in holding[0].page_content


def test_pdf_pages_in_metadata(tmp_path):
    path = write(tmp_path, "handbook.pdf", make_pdf([["The lamp is blue."], ["The warranty lasts 7 years."]],
                                                    title="Handbook"))
    docs = ingest(path, ["pdf"])
    assert [d.metadata["page"] for d in docs] == [1, 2]
    assert "7 years" in docs[1].page_content and docs[1].metadata["title"] == "Handbook"
    assert docs[0].metadata["source"] == str(path) and docs[0].metadata["line"] == 1



def pdf_sections(docs) -> list[tuple[list[str], int, int, str]]:
    return [(d.metadata["headings"], d.metadata["page"], d.metadata["line"], d.page_content) for d in docs]


@pytest.mark.parametrize("scaled", [False, True])
def test_pdf_headings_from_font_sizes(tmp_path, scaled):
    page = [("Lamp Handbook", 20, True), "Read this first.", ("Setup", 16, True), ("Unpacking", 14, False),
            "Lift the lamp out by its base.", ("Switching on", 14, False), "Press the button once.",
            ("Safety", 14, False), ("Keep it dry", 12, True), "Never open it while it is plugged in.",
            ("Bold warning paragraph line one", 12, True), ("and its line two.", 12, True), ("Care", 16, True), "Wipe with a dry cloth."]
    path = write(tmp_path, "lamp.pdf", make_pdf([page], scaled=scaled))
    docs = ingest(path, ["pdf"])
    assert pdf_sections(docs) == [
        (["Lamp Handbook"], 1, 1, "Read this first."),
        (["Setup", "Unpacking"], 1, 4, "Lift the lamp out by its base."),
        (["Setup", "Switching on"], 1, 6, "Press the button once."),
        (["Setup", "Safety", "Keep it dry"], 1, 9, "Never open it while it is plugged in.\n"
                                                   "Bold warning paragraph line one\nand its line two."),
        (["Care"], 1, 13, "Wipe with a dry cloth.")]
    assert {d.metadata["title"] for d in docs} == {"Lamp Handbook"}
    assert docs[1].metadata["heading"] == "Unpacking"


def test_pdf_wrapped_heading_is_one_heading_and_large_text_is_not_one(tmp_path):
    quote = [("A long quotation set large, line one", 16, False), ("line two of the quotation", 16, False),
             ("line three of the quotation", 16, False), ("and line four of it", 16, False)]
    page = [("Keeping the lamp", 16, True), ("in good order", 16, True), "Dust it weekly.", *quote,
            "Body text after the quotation, long enough to be the size most of the text is set in."]
    docs = ingest(write(tmp_path, "lamp.pdf", make_pdf([page, ["More body text, as most of a document is."] * 3])), ["pdf"])
    assert [d.metadata["headings"] for d in docs] == [["Keeping the lamp in good order"]]
    assert "line four" in docs[0].page_content and "More body text" in docs[0].page_content


def test_pdf_headings_from_the_outline(tmp_path):
    pages = [["Lamp Handbook", "Read this first."],
             ["Intro text that no bookmark names.", "Unpacking", "Lift the lamp out by its base."],
             ["Press the button once."]]
    outline = [(1, "Setup", 1), (2, "Unpacking", 1), (2, "Switching on", 2)]
    docs = ingest(write(tmp_path, "lamp.pdf", make_pdf(pages, title="The Lamp", outline=outline)), ["pdf"])
    assert pdf_sections(docs) == [
        ([], 1, 1, "Lamp Handbook\nRead this first."),
        (["Setup"], 2, 1, "Intro text that no bookmark names."),  # not on its page: starts at the top
        (["Setup", "Unpacking"], 2, 2, "Lift the lamp out by its base."),
        (["Setup", "Switching on"], 3, 1, "Press the button once.")]
    assert {d.metadata["title"] for d in docs} == {"The Lamp"}


def test_pdf_section_runs_across_a_page_break(tmp_path):
    first = [("Warranty", 16, True), "The warranty lasts 7 years", "from the date of purchase."]
    second = ["It covers the bulb,", "the switch and the cable.", ("Returns", 16, True), "Send it back within 30 days."]
    docs = ingest(write(tmp_path, "lamp.pdf", make_pdf([first, second])), ["pdf"])
    assert pdf_sections(docs) == [
        (["Warranty"], 1, 1, "The warranty lasts 7 years\nfrom the date of purchase.\nIt covers the bulb,\n"
                             "the switch and the cable."),
        (["Returns"], 2, 3, "Send it back within 30 days.")]
    long = [("Warranty", 16, True)] + [f"Sentence number {n} of the warranty terms." for n in range(40)]
    docs = ingest(write(tmp_path, "long.pdf", make_pdf([long[:30], long[30:]])), ["pdf"], chunk_size=300, chunk_overlap=0)
    assert len(docs) > 2 and {tuple(d.metadata["headings"]) for d in docs} == {("Warranty",)}
    assert (docs[0].metadata["page"], docs[0].metadata["line"]) == (1, 1)
    assert docs[-1].metadata["page"] == 2 and docs[-1].page_content.endswith("number 39 of the warranty terms.")
    for later in docs[1:]:  # a later chunk has the page and line where it starts
        page, line = later.metadata["page"], later.metadata["line"]
        assert later.page_content.startswith(long[(page - 1) * 30 + line - 1])


def test_pdf_running_headers_and_footers_are_dropped(tmp_path):
    pages = []
    names = ["Setup", "Care", "Repairs", "Disposal"]
    for n, name in enumerate(names, 1):
        body = [(name, 16, True), f"Fact: the lamp has {n * n} settings."]
        pages.append(["ACME LAMPS - OWNER GUIDE", *body, f"Page {n} of 4"])
    docs = ingest(write(tmp_path, "lamp.pdf", make_pdf(pages)), ["pdf"])
    assert pdf_sections(docs) == [([name], n, 2, f"Fact: the lamp has {n * n} settings.")
                                  for n, name in enumerate(names, 1)]
    plain = [["ACME LAMPS", f"The lamp weighs {n * n} kg.", str(n + 10)] for n in range(1, 4)]
    docs = ingest(write(tmp_path, "plain.pdf", make_pdf(plain)), ["pdf"])
    assert pdf_sections(docs) == [([], n, 2, f"The lamp weighs {n * n} kg.") for n in range(1, 4)]


def test_pdf_with_one_font_size_is_chunked_by_page(tmp_path):
    pages = [["Setup", "Lift the lamp out."], ["Care", "Wipe it dry."]]
    docs = ingest(write(tmp_path, "lamp.pdf", make_pdf(pages, title="Lamp")), ["pdf"])
    assert pdf_sections(docs) == [([], 1, 1, "Setup\nLift the lamp out."), ([], 2, 1, "Care\nWipe it dry.")]
    assert {d.metadata["title"] for d in docs} == {"Lamp"}


def test_pdf_without_text_is_skipped(tmp_path):
    from agentpeft.default_plugins.loaders import load_pdf
    from agentpeft.pipeline.ingest import SkipFile

    path = write(tmp_path, "scan.pdf", make_pdf([[], []]))
    with pytest.raises(SkipFile, match=r"no text layer in its 2 page\(s\)"):
        load_pdf(path)



def test_pdf_handbook_has_the_sections_of_its_word_twin():
    bench = Path(__file__).resolve().parents[1] / "bench" / "kbs"
    pdf, docx = bench / "orchid-clinic-pdf" / "kb" / "handbook.pdf", bench / "orchid-clinic" / "kb" / "handbook.docx"
    from_pdf, from_docx = ingest(pdf, ["pdf"]), ingest(docx, ["docx"])
    assert [d.metadata["headings"] for d in from_pdf] == [d.metadata["headings"] for d in from_docx]
    assert {d.metadata["title"] for d in from_pdf} == {d.metadata["title"] for d in from_docx}
    assert [d.metadata["page"] for d in from_pdf] == sorted(d.metadata["page"] for d in from_pdf)


def test_csv_and_tsv_pairs_with_configurable_columns(tmp_path):
    write(tmp_path, "faq.csv", 'q,a,fact\n"How long, exactly?","Seven\nyears.",7 years\n\nWhat colour?,Blue,\n,orphan answer,\n')
    write(tmp_path, "more.tsv", "q\ta\nWho?\tOdile\n")
    docs = ingest(tmp_path, ["csv"], options={"csv": {"question": "q", "answer": "a", "key": "fact"}})
    assert [(d.metadata["question"], d.page_content, d.metadata["line"]) for d in docs] == [
        ("How long, exactly?", "Seven\nyears.", 2), ("What colour?", "Blue", 5), ("Who?", "Odile", 2)]
    assert docs[0].metadata["key"] == "7 years" and "key" not in docs[1].metadata
    assert docs[0].metadata["source"].endswith("faq.csv")


def test_jsonl_pairs(tmp_path):
    write(tmp_path, "pairs.jsonl", '{"prompt": "Capital?", "response": "Paris", "key": "Paris"}\n\n'
                                   '{"prompt": "Year?", "response": 2016}\n')
    docs = ingest(tmp_path, ["jsonl"], options={"jsonl": {"question": "prompt", "answer": "response"}})
    assert [(d.metadata["question"], d.page_content, d.metadata["line"]) for d in docs] == [
        ("Capital?", "Paris", 1), ("Year?", "2016", 3)]
    assert docs[0].metadata["key"] == "Paris"


QNA = """version: 3
domain: lamps
seed_examples:
  - context: |
      Brindlewick lamps are blue.
    questions_and_answers:
      - question: What colour are the lamps?
        answer: Blue.
      - question: "Are they red?"
        answer: >
          No, they are blue.
  - question: Who founded Brindlewick?
    answer: Odile Fenwarden
    key: Odile
document_outline: lamps
"""


def test_yaml_seed_examples(tmp_path):
    write(tmp_path, "qna.yaml", QNA)
    docs = ingest(tmp_path, ["yaml"])
    assert [(d.metadata["question"], d.page_content, d.metadata["line"]) for d in docs] == [
        ("What colour are the lamps?", "Blue.", 7), ("Are they red?", "No, they are blue.", 9),
        ("Who founded Brindlewick?", "Odile Fenwarden", 12)]
    assert docs[0].metadata["context"] == "Brindlewick lamps are blue."
    assert docs[2].metadata["key"] == "Odile" and "context" not in docs[2].metadata


MEDQUAD_XML = """<?xml version="1.0" encoding="UTF-8"?>
<Document id="1" source="NIDDK" url="http://example.org/x">
<Focus>Acromegaly</Focus>
<QAPairs>
  <QAPair pid="1">
    <Question qid="1-1" qtype="information">What is (are) Acromegaly ?</Question>
    <Answer>A hormonal disorder &quot;sneaky&quot;.
        
        Second paragraph.</Answer>
  </QAPair>
  <QAPair pid="2">
    <Question qid="1-2" qtype="symptoms">What are the symptoms of Acromegaly ?</Question>
    <Answer></Answer>
  </QAPair>
</QAPairs>
</Document>
"""


def test_medquad_pairs_and_empty_answers_left_out(tmp_path):
    path = write(tmp_path, "0001.xml", MEDQUAD_XML)
    [doc] = ingest(path, ["medquad"])
    assert doc.page_content == 'A hormonal disorder "sneaky".\n\nSecond paragraph.'
    assert doc.metadata == {"source": str(path), "line": 5, "question": "What is (are) Acromegaly ?",
                            "qtype": "information", "qid": "1-1", "focus": "Acromegaly",
                            "url": "http://example.org/x", "collection": "NIDDK"}


@pytest.mark.skipif(not MEDQUAD.is_dir(), reason=f"the MedQuAD subset is not at {MEDQUAD} (../shared is absent)")
def test_medquad_subset_every_file_loads_and_counts_match():
    files = sorted(MEDQUAD.rglob("*.xml"))
    expected = {}
    for f in files:  # counted independently of the loader: the standard library's parser
        pairs = ET.parse(f).getroot().iter("QAPair")
        expected[str(f)] = sum(1 for p in pairs if "".join(p.find("Answer").itertext()).strip())
    docs = ingest(MEDQUAD, ["medquad"])
    got: dict[str, int] = {}
    for doc in docs:
        got[doc.metadata["source"]] = got.get(doc.metadata["source"], 0) + 1
    assert len(files) > 200 and len(docs) == sum(expected.values()) > 1000
    assert got == {f: n for f, n in expected.items() if n}
    assert all(d.metadata["question"] and d.metadata["qtype"] and "focus" in d.metadata for d in docs)


# --- folders -------------------------------------------------------------------------------------

def test_folders_are_read_recursively_hidden_and_unknown_files_ignored(tmp_path):
    write(tmp_path, "a.md", "## One?\n\nFirst.\n")
    write(tmp_path, "sub/deeper/b.md", "## Two?\n\nSecond.\n")
    write(tmp_path, "sub/c.txt", "Plain.\n")
    write(tmp_path, "sub/image.png", b"\x89PNG\x00\x00")
    write(tmp_path, ".git/d.md", "## Hidden?\n\nNo.\n")
    write(tmp_path, "sub/.draft.md", "## Draft?\n\nNo.\n")
    docs = ingest(tmp_path, ["markdown", "text"])
    assert [Path(d.metadata["source"]).relative_to(tmp_path).as_posix() for d in docs] == [
        "a.md", "sub/c.txt", "sub/deeper/b.md"]
    assert len(ingest(tmp_path)) == 3  # every loader when none is named


def test_loaders_take_options_and_plugins_can_add_a_format(tmp_path):
    seen = {}

    class Plugin:
        @hookimpl
        def register_loaders(self, register):
            def load(path, chunk_size, sep=":"):
                seen.update(chunk_size=chunk_size, sep=sep)
                return []
            register(Loader("custom", (".cus",), load))

            def plain(path):  # a loader with no options still works
                from langchain_core.documents import Document
                return [Document(page_content=path.read_text(), metadata={"source": str(path), "line": 1})]
            register(Loader("plain", (".pln",), plain))

    plugins.load_plugins()
    plugins.pm.register(Plugin(), "test-loaders")
    try:
        write(tmp_path, "x.cus", "anything")
        write(tmp_path, "y.pln", "plain text")
        docs = ingest(tmp_path, ["custom", "plain"], options={"custom": {"sep": "|"}}, chunk_size=99,
                      chunk_overlap=9)
        assert seen == {"chunk_size": 99, "sep": "|"} and [d.page_content for d in docs] == ["plain text"]
        with pytest.raises(AgentpeftError, match=r"loader_options.custom: unknown option\(s\) \['sepp'\].*takes sep"):
            ingest(tmp_path, ["custom"], options={"custom": {"sepp": "|"}})
        with pytest.raises(AgentpeftError, match="loader_options names unknown loader"):
            ingest(tmp_path, ["custom"], options={"cvs": {}})
    finally:
        plugins.pm.unregister(name="test-loaders")
    assert set(LOADERS) <= set(get_loaders())


def test_data_config_fields():
    config = DataConfig()
    assert (config.loader_options, config.chunk_size, config.chunk_overlap, config.strict) == ({}, 1500, 150, False)
    with pytest.raises(ValueError, match="chunk_overlap"):
        DataConfig(chunk_size=200, chunk_overlap=200)


# --- bad input -----------------------------------------------------------------------------------

def test_unreadable_binary_non_utf8_and_empty_files_are_skipped_with_one_warning(tmp_path, caplog):
    write(tmp_path, "good.md", "## Fine?\n\nYes.\n")
    write(tmp_path, "binary.md", b"## T\n\x00\x01\x02")
    write(tmp_path, "latin1.txt", "caf\xe9 cr\xe8me".encode("latin-1"))
    write(tmp_path, "empty.md", "")
    write(tmp_path, "blank.txt", "\n \n\t\n")
    (tmp_path / "dangling.md").symlink_to(tmp_path / "missing.md")
    os.mkfifo(tmp_path / "pipe.md")
    with caplog.at_level(logging.WARNING, logger="agentpeft.pipeline.ingest"):
        docs = ingest(tmp_path, ["markdown", "text"])
    assert [d.page_content for d in docs] == ["Yes."]
    [record] = caplog.records
    message = record.getMessage()
    for expected in ("binary.md (binary)", "latin1.txt (not UTF-8 text (byte 3))", "dangling.md (unreadable",
                     "pipe.md (not a regular file)", "empty.md (empty)", "blank.txt (empty)"):
        assert expected in message
    with pytest.raises(AgentpeftError, match=r"4 file\(s\) .* cannot be read: .*binary\.md.*--strict") as err:
        ingest(tmp_path, ["markdown", "text"], strict=True)
    assert "empty.md" not in str(err.value)  # empty files are skipped, never an error


def test_unreadable_pdf_is_skipped(tmp_path, caplog):
    write(tmp_path, "broken.pdf", b"%PDF-1.4\nnot really a pdf")
    write(tmp_path, "ok.pdf", make_pdf([["Fine text."]]))
    with caplog.at_level(logging.WARNING):
        docs = ingest(tmp_path, ["pdf"])
    assert [d.page_content for d in docs] == ["Fine text."]
    assert "broken.pdf (not a readable PDF" in caplog.text


def test_a_knowledge_base_that_yields_nothing_fails_clearly(tmp_path):
    write(tmp_path, "bin.md", b"\x00\x00")
    write(tmp_path, "empty.md", "")
    with pytest.raises(AgentpeftError, match=r"is empty: its files hold no text \(skipped 1 file.*bin\.md \(binary\)"
                                             r".*empty\.md \(empty\).*add documents"):
        ingest(tmp_path, ["markdown"])
    with pytest.raises(AgentpeftError, match="no loader reads notes.doc"):
        ingest(write(tmp_path, "notes.doc", "x"), ["markdown"])


def test_very_long_lines_load_in_bounded_chunks(tmp_path):
    write(tmp_path, "wide.md", "## Wide\n\n" + "x" * 200_000 + "\n")
    write(tmp_path, "wide.txt", "word " * 50_000)
    docs = ingest(tmp_path, ["markdown", "text"], chunk_size=1000, chunk_overlap=100)
    assert all(len(d.page_content) <= 1000 for d in docs)
    assert sum(len(d.page_content) for d in docs if d.metadata["heading"] == "Wide") >= 200_000


@pytest.mark.parametrize("name, text, where", [
    ("bad.yaml", "seed_examples:\n  - question: ok\n    answer: [unclosed\n", "bad.yaml:4"),
    ("tab.yaml", "seed_examples:\n\t- question: x\n", "tab.yaml:2"),
    ("noseeds.yaml", "version: 3\ndomain: x\n", "noseeds.yaml:1: no 'seed_examples'"),
    ("noanswer.yaml", "seed_examples:\n  - question: q\n    context: c\n", "noanswer.yaml:2: item has no 'answer'"),
    ("bad.jsonl", '{"question": "q", "answer": "a"}\n{"question": "q",\n', "bad.jsonl:2: invalid JSON"),
    ("list.jsonl", '["q", "a"]\n', "list.jsonl:1: a list where a JSON object"),
    ("nofield.jsonl", '{"q": "x", "answer": "y"}\n', "nofield.jsonl:1: no 'question' field"),
    ("nested.jsonl", '{"question": {"a": 1}, "answer": "y"}\n', "nested.jsonl:1: field 'question' must be text"),
    ("bad.csv", 'question,answer\nq1,a1\n"q2,a2\n', "bad.csv:3: malformed CSV"),
    ("ragged.csv", "question,answer\nq1,a1\nq2,a2,extra\n", "ragged.csv:3: 3 fields where the header has 2"),
    ("cols.csv", "Q,A\nq,a\n", "cols.csv:1: no column 'question'"),
    ("bad.xml", "<Document>\n<QAPairs>\n<QAPair>\n</Document>\n", "bad.xml:4: malformed XML"),
    ("other.xml", "<?xml version='1.0'?>\n<Other/>\n", "other.xml:2: root element <Other>"),
])
def test_malformed_structured_files_are_skipped_with_a_warning_or_fail_under_strict(tmp_path, caplog, name, text,
                                                                                    where):
    write(tmp_path, "good.md", "## Fine?\n\nYes.\n")
    write(tmp_path, name, text)
    with caplog.at_level(logging.WARNING):
        docs = ingest(tmp_path)  # one bad file does not stop the others
    assert {d.metadata["source"] for d in docs} == {str(tmp_path / "good.md")}
    assert name in caplog.text
    with pytest.raises(AgentpeftError) as err:
        ingest(tmp_path, strict=True)
    assert name in str(err.value)
    detail = where.split(":", 2)[-1].strip()
    assert detail in str(err.value) or detail in caplog.text


def test_xml_entities_are_not_expanded(tmp_path):
    bomb = ('<?xml version="1.0"?>\n<!DOCTYPE d [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">'
            '<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;">]>\n<Document><QAPairs><QAPair><Question>q?</Question>'
            '<Answer>&c;&c;&c;</Answer></QAPair></QAPairs></Document>\n')
    path = write(tmp_path, "bomb.xml", bomb)
    try:
        docs = ingest(path, ["medquad"])
    except AgentpeftError:
        return  # refusing the file is fine too
    assert all(len(d.page_content) < 100 for d in docs)


def test_symlink_loops_are_not_followed_forever(tmp_path):
    kb = tmp_path / "kb"
    write(kb, "sub/a.md", "## A?\n\nAnswer.\n")
    (kb / "sub" / "loop").symlink_to(kb)  # a folder that contains itself
    (kb / "sub" / "again").symlink_to(kb / "sub")
    (kb / "self.md").symlink_to(kb / "self.md")  # a link to itself
    (kb / "same.md").symlink_to(kb / "sub" / "a.md")  # the same file twice: read once
    docs = ingest(kb, ["markdown"])
    assert [d.page_content for d in docs] == ["Answer."]
    with pytest.raises(AgentpeftError, match=r"self\.md \(unreadable \(Too many levels of symbolic links"):
        ingest(kb, ["markdown"], strict=True)


def test_a_single_document_knowledge_base(tmp_path):
    [doc] = ingest(write(tmp_path, "one.md", "One line."), ["markdown"])
    assert doc.page_content == "One line." and doc.metadata["line"] == 1


# --- fuzzing: random input never raises anything but AgentpeftError ---------------------------

_TOKENS = ["#", "## ", "```", "~~~", "\n", "\n\n", "::", "===", "---", "  ", "\t", ",", '"', "\\", "<", ">", "</",
           "h1", "pre", "&", ";", "seed_examples:", "- ", "question", "answer", ":", "{", "}", "[", "]",
           "QAPair", "Document", "%PDF-1.4", "obj", "endobj", "stream", "\x00", "\xe9", "\ufeff", "*", "|"]
_text = st.lists(st.one_of(st.sampled_from(_TOKENS), st.text(max_size=8)), max_size=60).map("".join)
_FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _load_or_agentpeft_error(path: Path, data: bytes, loader: str) -> None:
    path.write_bytes(data)
    try:
        docs = ingest(path, [loader])
    except AgentpeftError:
        return
    assert docs and all(d.page_content.strip() and "source" in d.metadata and "line" in d.metadata for d in docs)


@pytest.mark.parametrize("loader", LOADERS)
@_FUZZ
@given(data=st.binary(max_size=400))
def test_fuzz_random_bytes(tmp_path, loader, data):
    _load_or_agentpeft_error(tmp_path / f"fuzz{SUFFIX[loader]}", data, loader)


@pytest.mark.parametrize("loader", LOADERS)
@_FUZZ
@given(text=_text, chunk=st.integers(60, 400))
def test_fuzz_structured_text(tmp_path, loader, text, chunk):
    path = tmp_path / f"fuzz{SUFFIX[loader]}"
    path.write_bytes((b"%PDF-1.4\n" if loader == "pdf" else b"") + text.encode())
    try:
        docs = ingest(path, [loader], chunk_size=chunk, chunk_overlap=chunk // 10)
    except AgentpeftError:
        return
    assert docs and all(d.page_content.strip() for d in docs)
