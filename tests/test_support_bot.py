"""support-bot: resolved-ticket export as input, brand voice and escalation in the system prompt."""

import json
from pathlib import Path


from agentpeft.recipe import get_recipes

KB = Path(__file__).resolve().parents[1] / "recipes" / "support-bot" / "kb"


def test_system_prompt_sets_the_voice_and_escalates_through_create_ticket():
    prompt = get_recipes()["support-bot"].system_prompt
    assert "friendly" in prompt and "briefly" in prompt and "create_ticket" in prompt


def test_tickets_are_resolved_conversations_whose_key_is_in_the_answer():
    rows = [json.loads(line) for line in (KB / "tickets.jsonl").read_text().splitlines()]
    assert len(rows) >= 10
    kb_text = " ".join(p.read_text() for p in KB.glob("*.md"))
    for row in rows:
        assert row["question"].strip() and row["key"] in row["answer"]
        assert row["key"] in kb_text  # the ticket answers agree with the knowledge base


def test_jsonl_loader_reads_one_document_per_ticket():
    from agentpeft.pipeline.ingest import get_loaders
    docs = get_loaders()["jsonl"].load(KB / "tickets.jsonl")
    rows = [json.loads(line) for line in (KB / "tickets.jsonl").read_text().splitlines()]
    assert [d.metadata["question"] for d in docs] == [r["question"] for r in rows]
    assert [d.page_content for d in docs] == [r["answer"] for r in rows]
