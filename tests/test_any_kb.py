"""Any knowledge base in: Word and web pages read as sections, generators that fit each section, prose
synthesis for the rest, a report of what was learned per file, and retrieval where prose dominates."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from langchain_core.documents import Document

from agentpeft.errors import AgentpeftError
from agentpeft.pipeline.dataset import fallback_plan, make_dataset
from agentpeft.pipeline.ingest import ingest
from agentpeft.progress import set_enabled
from agentpeft.recipe import configure, get_recipe

PROSE = """# Riverside Library help

## Borrowing

Members may borrow up to 12 items at a time. Books are lent for 21 days, and a loan can be renewed twice online.

## Late returns

A late book costs $0.25 per day, up to a cap of $6 per item. Fines under $1 are waived at the desk.

## Opening hours

The main branch opens Tuesday through Saturday from 9 a.m. to 7 p.m. The reading room closes at 6 p.m.
"""


@pytest.fixture(autouse=True)
def _quiet():
    set_enabled(False)
    yield
    set_enabled(True)


def _docx(path: Path) -> Path:
    import docx

    d = docx.Document()
    d.add_heading("Clinic handbook", level=1)
    d.add_paragraph("This handbook is for staff and clients.")
    d.add_heading("Appointments", level=2)
    d.add_paragraph("A missed appointment costs $32 unless cancelled 24 hours ahead.")
    d.add_paragraph("Bring the vaccination card", style="List Bullet")
    d.add_paragraph("Arrive ten minutes early", style="List Bullet")
    d.add_heading("Fees", level=2)
    table = d.add_table(rows=2, cols=2)
    table.cell(0, 0).text, table.cell(0, 1).text = "Service", "Price"
    table.cell(1, 0).text, table.cell(1, 1).text = "Nail trim", "$14"
    path.parent.mkdir(parents=True, exist_ok=True)
    d.save(str(path))
    return path


def test_docx_reads_heading_styles_lists_and_tables_as_sections(tmp_path):
    docs = ingest(_docx(tmp_path / "kb" / "handbook.docx"))
    by_heading = {d.metadata["heading"]: d for d in docs}
    assert set(by_heading) == {"Clinic handbook", "Appointments", "Fees"}
    appointments = by_heading["Appointments"]
    assert appointments.metadata["headings"] == ["Clinic handbook", "Appointments"]
    assert appointments.metadata["title"] == "Clinic handbook"
    assert "costs $32" in appointments.page_content and "- Bring the vaccination card" in appointments.page_content
    assert "Nail trim | $14" in by_heading["Fees"].page_content


def test_html_page_furniture_is_not_content(tmp_path):
    page = tmp_path / "kb" / "rooms.html"
    page.parent.mkdir()
    page.write_text("""<html><head><title>Rooms | Harbor</title><script>var x = "tracking";</script></head><body>
<header class="site-header"><a href="/">Harbor</a></header>
<nav><a href="/plans">Plans</a> <a href="/rooms">Meeting rooms</a></nav>
<div class="breadcrumb">Help / Rooms</div>
<main><article><h1>Meeting rooms</h1><p>The Skerry room seats 10 and costs $40 per hour.</p>
<aside>Related: printing</aside><h2>Booking</h2><p>Book up to 30 days ahead.</p></article></main>
<div id="cookie-banner">We use cookies. Accept?</div>
<footer>&copy; Harbor Coworking. Privacy. Terms.</footer></body></html>""")
    docs = ingest(page)
    text = " ".join(d.page_content for d in docs)
    assert "Skerry room seats 10" in text and "30 days ahead" in text
    for chrome in ("Plans", "Help / Rooms", "cookies", "Privacy", "tracking", "Related: printing"):
        assert chrome not in text, chrome
    assert [d.metadata["heading"] for d in docs] == ["Meeting rooms", "Booking"]


def test_pdf_without_a_text_layer_is_named_and_a_kb_of_only_such_files_fails(tmp_path, caplog):
    from pypdf import PdfWriter

    scanned = tmp_path / "kb" / "scan.pdf"
    scanned.parent.mkdir()
    writer = PdfWriter()
    writer.add_blank_page(width=200, height=200)
    with open(scanned, "wb") as fh:
        writer.write(fh)
    with pytest.raises(AgentpeftError, match=r"scan\.pdf \(no text layer .*OCR"):
        ingest(tmp_path / "kb")
    (tmp_path / "kb" / "help.md").write_text(PROSE)
    with caplog.at_level(logging.WARNING):
        docs = ingest(tmp_path / "kb")
    assert docs and "scan.pdf (no text layer" in caplog.text


def test_a_malformed_structured_file_is_skipped_unless_strict(tmp_path, caplog):
    kb = tmp_path / "kb"
    kb.mkdir()
    (kb / "help.md").write_text(PROSE)
    (kb / "broken.jsonl").write_text('{"question": "a?", "answer": "b"}\n{not json\n')
    with caplog.at_level(logging.WARNING):
        docs = ingest(kb)
    assert docs and "broken.jsonl" in caplog.text and "invalid JSON" in caplog.text
    with pytest.raises(AgentpeftError, match=r"broken\.jsonl:2: invalid JSON"):
        ingest(kb, strict=True)


def test_fallback_plan_gives_each_uncovered_section_the_generator_that_fits():
    from agentpeft.pipeline.dataset import Pair

    docs = [Document(page_content="Prose about plans.", metadata={"source": "a.md", "line": 1, "heading": "Plans"}),
            Document(page_content="- **Price:** $5", metadata={"source": "a.md", "line": 5, "heading": "Lamp"}),
            Document(page_content="Yes.", metadata={"source": "a.md", "line": 9, "heading": "Can I?"}),
            Document(page_content="42", metadata={"source": "t.jsonl", "line": 1, "question": "Answer?"})]
    covered = [Pair(question="What is the price of the Lamp?", answer="$5", source="a.md:6")]
    plan = fallback_plan(docs, covered, ["facts"])
    assert {name: [d.metadata["line"] for d in ds] for name, ds in plan.items()} == {
        "qa": [1], "faq": [9], "prose": [1]}
    assert list(plan) == ["qa", "faq", "prose"]
    # A listed generator already saw every section: it is not run again on what it left.
    assert "prose" not in fallback_plan(docs, covered, ["facts", "prose"])


def test_prose_knowledge_base_builds_with_a_recipe_made_for_faqs(tmp_path, tiny_base, home):
    kb = tmp_path / "my-help-pages"
    kb.mkdir()
    (kb / "library.md").write_text(PROSE)
    _docx(kb / "clinic.docx")
    (kb / "empty-section.md").write_text("# Notes\n\n## Misc\n\nOk.\n")
    lines: list[str] = []
    result = make_dataset("support-bot", kb=kb, out=tmp_path / "out", base=str(tiny_base), log=lines.append)
    card = result.card
    assert card["per_generator"]["prose"] >= 8 and card["facts"] >= 8
    library = card["per_source"]["library.md"]
    assert library["generators"]["prose"] >= 6 and library["documents"] == 3
    # What the model will not know is listed per file, in the card and in the log.
    assert any("Misc" in s for s in card["per_source"]["empty-section.md"]["sections_without_pairs"])
    assert any(line.strip().startswith("library.md: 3 section(s) ->") for line in lines)
    assert any("empty-section.md" in line and "nothing from" in line for line in lines)
    assert "sections without pairs" in (tmp_path / "out" / "dataset_card.md").read_text()
    rows = [json.loads(x) for x in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    prose = [r for r in rows if r["generator"] == "prose"]
    assert any(r["key"] == "21 days" and "21 days" in r["answer"] for r in prose)
    assert any(r["key"] == "$0.25 per day" for r in prose)
    # Every answer is grounded: a sentence of the knowledge base.
    text = " ".join(PROSE.split()) + " missed appointment costs $32 unless cancelled 24 hours ahead."
    assert all(r["answer"] in text for r in prose if "library.md" in r["source"])
    # The anti-forgetting mix comes with every recipe's defaults.
    assert card["train_only"] >= 150


def test_pinned_generators_leave_prose_alone(tmp_path, tiny_base, home):
    kb = tmp_path / "kb"
    kb.mkdir()
    (kb / "library.md").write_text(PROSE)
    recipe = get_recipe("support-bot")
    pinned = recipe.model_copy(update={"data": recipe.data.model_copy(update={"auto_generators": False})})
    with pytest.raises(AgentpeftError, match="yields no question/answer pair"):
        make_dataset(pinned, kb=kb, out=tmp_path / "out", base=str(tiny_base), log=lambda s: None)


def test_the_model_identity_follows_the_knowledge_base(tmp_path):
    recipe = get_recipe("support-bot")
    assert "Brindlewick" in configure(recipe).system_prompt
    assert "Brindlewick" in configure(recipe, kb=recipe.kb_path).system_prompt  # its own knowledge base
    other = configure(recipe, kb=tmp_path)
    assert "Brindlewick" not in other.system_prompt and other.system_prompt == recipe.kb_system_prompt
    assert configure(recipe, kb=tmp_path, system_prompt=" You are Acme's helper. ").system_prompt == "You are Acme's helper."
    with pytest.raises(AgentpeftError, match="--system-prompt is empty"):
        configure(recipe, system_prompt="  ")


def test_cli_system_prompt_and_retrieval_reach_the_build(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from agentpeft.cli import cli

    seen = {}

    def fake_build(recipe, **kwargs):
        seen.update(kwargs)
        raise AgentpeftError("stop here")

    monkeypatch.setattr("agentpeft.pipeline.build.build", fake_build)
    out = CliRunner().invoke(cli, ["build", "support-bot", "--system-prompt", "Be brief.", "--retrieval", "on"])
    assert out.exit_code == 1 and "stop here" in out.output
    assert seen["system_prompt"] == "Be brief." and seen["retrieval"] is True


def test_retrieval_passages_keep_whole_sentences_and_general_questions_retrieve_nothing():
    from agentpeft.retrieval import PassageIndex, augment_question, passages, retrieve

    long = " ".join(f"Rule {i} says the locker fee is ${i}." for i in range(1, 40))
    doc = Document(page_content=long, metadata={"source": "a.md", "line": 1, "heading": "Lockers"})
    pieces = passages([doc], 120)
    assert len(pieces) > 5 and all(len(p.page_content) <= 120 for p in pieces)
    assert all(p.page_content.endswith(".") for p in pieces)  # never cut mid-sentence
    index = PassageIndex([doc, Document(page_content=PROSE, metadata={"source": "b.md", "line": 1})])
    assert "Rule 7 says" in retrieve(index, "what is the locker fee in rule 7", 1)[0].page_content
    assert retrieve(index, "What is the capital of France?", 3) == []
    assert augment_question("What is the capital of France?", []) == "What is the capital of France?"


def test_retrieval_turns_on_where_prose_dominates():
    from agentpeft.pipeline.build import uses_retrieval

    recipe = get_recipe("support-bot")
    assert recipe.retrieval.enabled == "auto"
    assert uses_retrieval(recipe, {"facts": 10, "per_generator": {"prose": 9, "faq": 1, "general": 200}})
    assert not uses_retrieval(recipe, {"facts": 84, "per_generator": {"faq": 48, "facts": 24, "qa": 12}})
    off = configure(recipe, retrieval=False)
    assert not uses_retrieval(off, {"facts": 10, "per_generator": {"prose": 10}})
    assert uses_retrieval(configure(recipe, retrieval=True), {"facts": 84, "per_generator": {"faq": 84}})
