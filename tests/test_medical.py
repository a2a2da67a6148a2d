"""medical-qa: sample knowledge base, safety note, refusals, their metrics and the safety_check tool."""

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml
from langchain_core.documents import Document

from agentpeft import plugins
from agentpeft.default_plugins import medical
from agentpeft.pipeline.dataset import Pair, get_generators
from agentpeft.pipeline.evaluate import get_metrics
from agentpeft.recipe import get_recipes

KB = Path(__file__).resolve().parents[1] / "recipes" / "medical-qa" / "kb"


def test_recipe_is_registered_with_its_safety_settings():
    recipe = get_recipes()["medical-qa"]
    assert recipe.data.redact_pii and recipe.data.filters == ["safety_note"]
    assert recipe.data.loaders is None  # every registered loader, MedQuAD XML among them
    assert {"qa", "faq", "refusals"} <= set(recipe.data.generators)
    assert recipe.eval.primary == "token_f1"
    assert recipe.eval.metrics == ["token_f1", "rouge_l", "accuracy", "safety_note", "refusal"]
    assert recipe.tools == ["safety_check"] and recipe.kb_path.is_dir()


def test_sample_knowledge_base_has_about_forty_pairs_in_three_formats():
    xml_pairs = 0
    for path in sorted((KB / "medquad").glob("*.xml")):
        root = ET.parse(path).getroot()
        assert root.tag == "Document" and root.findtext("Focus").strip()
        for qa in root.iter("QAPair"):
            question = qa.find("Question")
            assert question.get("qtype") and question.text.strip() and qa.findtext("Answer").strip()
            xml_pairs += 1
    seeds = yaml.safe_load((KB / "qna.yaml").read_text())["seed_examples"]
    assert all(s["question"].endswith("?") and s["answer"] for s in seeds)
    from agentpeft.default_plugins.loaders import load_markdown

    faq = list(get_generators()["faq"].generate(load_markdown(KB / "general-health.md")))
    assert all(p.key for p in faq)
    assert 40 <= xml_pairs + len(seeds) + len(faq) <= 50


@pytest.mark.parametrize("question, flags", [
    ("How many mg of ibuprofen should I take?", ["dosing"]),
    ("How much insulin do I need?", ["dosing"]),
    ("Do I have diabetes?", ["diagnosis"]),
    ("Could my symptoms mean I have asthma?", ["diagnosis"]),
    ("I have crushing chest pain and can't breathe", ["emergency"]),
    ("What is the usual adult dose of ibuprofen?", []),
    ("How is diabetes diagnosed?", []),
    ("How much sleep do I need?", []),
    ("What causes heartburn?", []),
])
def test_classify(question, flags):
    assert medical.classify(question) == flags


def test_refusals_generator_asks_dosing_and_diagnosis_and_points_to_a_clinician():
    docs = [Document(page_content="Pain relievers such as ibuprofen or acetaminophen can help.",
                     metadata={"source": "a.xml", "line": 1, "focus": "Common Cold", "question": "q"}),
            Document(page_content="Treatment may include iron supplements.",
                     metadata={"source": "b.xml", "line": 1, "focus": "Iron Deficiency Anemia", "question": "q"}),
            Document(page_content="no focus here", metadata={"source": "c.md", "line": 1})]
    pairs = list(get_generators()["refusals"].generate(docs))
    questions = [p.question for p in pairs]
    assert questions == ["Do I have Common Cold?", "Do I have Iron Deficiency Anemia?",
                         "How many mg of acetaminophen should I take?", "How many mg of ibuprofen should I take?",
                         "How many mg of iron should I take?"]
    for pair in pairs:
        kind = "diagnosis" if pair.question.startswith("Do I") else "dosing"
        for q in [pair.question, *pair.paraphrases]:
            assert medical.classify(q) == [kind], q  # the held-out paraphrase is a refusal question too
        assert medical.is_refusal(pair.answer) and pair.key in pair.answer


def test_safety_note_filter_adds_the_note_once():
    pairs = [Pair("What is a cold?", "A mild viral infection."), Pair("q", "Done. " + medical.SAFETY_NOTE)]
    out = medical.add_safety_notes(pairs)
    assert out[0].answer == "A mild viral infection. " + medical.SAFETY_NOTE
    assert out[1].answer == pairs[1].answer
    assert pairs[0].answer == "A mild viral infection."  # the input pairs are left alone


def test_safety_note_and_refusal_metrics():
    metrics = get_metrics()
    refs = [{"question": "How many mg of ibuprofen should I take?", "answer": "x"},
            {"question": "Do I have asthma?", "answer": "x"},
            {"question": "What causes heartburn?", "answer": "x"}]
    replies = ["I can't recommend a dose for you; please ask a pharmacist. " + medical.SAFETY_NOTE,
               "Yes, you have asthma.",
               "Acid flowing back up. " + medical.SAFETY_NOTE]
    assert metrics["safety_note"].score(replies, refs) == pytest.approx(2 / 3)
    assert metrics["refusal"].score(replies, refs) == 0.5  # the heartburn question is not counted
    assert metrics["refusal"].score(["x"], [refs[2]]) == 0.0
    assert not medical.is_refusal("Acid flowing back up. " + medical.SAFETY_NOTE)


def test_safety_check_tool():
    tool = medical.safety_check_tool()
    assert tool.name == "safety_check" and set(tool.args) == {"question"}
    flagged = json.loads(tool.invoke({"question": "How many mg of naproxen should I take for my back?"}))
    assert flagged["flags"] == ["dosing"] and "pharmacist" in flagged["advice"]
    urgent = json.loads(tool.invoke({"question": "My father has chest pain and his face is drooping"}))
    assert urgent["flags"] == ["emergency"] and "emergency number" in urgent["advice"]
    assert json.loads(tool.invoke({"question": "What is hay fever?"}))["flags"] == []


def test_safety_note_filter_is_registered():
    assert "safety_note" in {f.name for f in plugins.collect("register_filters")}


def test_safety_check_is_registered_for_medical_qa_only():
    from agentpeft.langchain import collect_tools

    def tools_for(recipe):
        return {t.name for t in collect_tools(recipe)}

    recipes = get_recipes()
    assert "safety_check" in tools_for(recipes["medical-qa"]) and "safety_check" in tools_for(None)
    assert "safety_check" not in tools_for(recipes["support-bot"])


def test_medical_qa_builds_on_the_tiny_model(tiny_base, home):
    recipe = get_recipes()["medical-qa"]
    from agentpeft.pipeline.build import build

    result = build("medical-qa", base=str(tiny_base), max_steps=2, allow_regression=True, show_progress=False,
                   log=lambda s: None)
    assert result.version == 1 and set(result.eval.tuned) == set(recipe.eval.metrics)
    rows = [json.loads(line) for line in (result.build_dir / "data" / "train.jsonl").read_text().splitlines()]
    assert all(r["answer"].endswith(medical.SAFETY_NOTE) for r in rows)
    assert any(medical.is_refusal(r["answer"]) for r in rows) and any(".xml" in r["source"] for r in rows)


# --- MedQuAD XML: both schemas; stray files are skipped, not fatal ---------------------------------

SECOND_SCHEMA = """<?xml version="1.0" encoding="UTF-8"?>
<doc docid="0000099" corpus="NINDS" url="http://example.org/brindle">
<doctitle-focus>Brindle Syndrome</doctitle-focus>
<umls>
<cui></cui>
</umls>
<qaPairs>
<pair pid="1">
<question qid="0000099-1" qtype="information">what is brindle syndrome ?</question>
<answer>Brindle syndrome is a made-up disorder of the left  elbow.   It is rare.</answer>
</pair>
<pair pid="2">
<question qid="0000099-2" qtype="treatment">is there any treatment for Brindle ?</question>
<answer></answer>
</pair>
</qaPairs>
</doc>
"""


def test_medquad_loader_reads_the_second_schema(tmp_path):
    from agentpeft.pipeline.ingest import ingest

    path = tmp_path / "0000099.xml"
    path.write_text(SECOND_SCHEMA)
    [doc] = ingest(path, ["medquad"])
    assert doc.page_content == "Brindle syndrome is a made-up disorder of the left  elbow.   It is rare."
    assert doc.metadata == {"source": str(path), "line": 8, "question": "what is brindle syndrome ?",
                            "qtype": "information", "qid": "0000099-1", "focus": "Brindle Syndrome",
                            "url": "http://example.org/brindle", "collection": "NINDS"}


def test_medquad_loader_skips_foreign_and_broken_xml_with_the_reason(tmp_path, caplog):
    from agentpeft.errors import AgentpeftError
    from agentpeft.pipeline.ingest import SkipFile, ingest

    kb = tmp_path / "kb"
    kb.mkdir()
    (kb / "0000099.xml").write_text(SECOND_SCHEMA)
    (kb / "sitemap.xml").write_text("<?xml version='1.0'?>\n<urlset><url/></urlset>\n")
    (kb / "broken.xml").write_text("<Document>\n<QAPairs>\n<QAPair>\n</Document>\n")
    with caplog.at_level("WARNING"):
        docs = ingest(kb, ["medquad"])
    assert [d.metadata["question"] for d in docs] == ["what is brindle syndrome ?"]
    [warning] = [r.getMessage() for r in caplog.records if "ingest skipped" in r.getMessage()]
    assert "sitemap.xml (line 2: root element <urlset> is not MedQuAD's <Document> or <doc>)" in warning
    assert "broken.xml (malformed XML, line 4: " in warning
    with pytest.raises(SkipFile, match="root element <urlset>"):
        from agentpeft.default_plugins.medquad import load_medquad

        load_medquad(kb / "sitemap.xml")
    # --strict turns the skipped files into one error that names both
    with pytest.raises(AgentpeftError, match=r"2 file\(s\) .*broken\.xml \(malformed XML.*sitemap\.xml"):
        ingest(kb, ["medquad"], strict=True)


MEDQUAD = Path(__file__).resolve().parents[2] / "shared" / "data" / "medquad"
#: A NIDDK file that asks five of its questions twice, each time with another answer, some too long for one pair.
REPEATS = MEDQUAD / "5_NIDDK_QA" / "0000136.xml"


@pytest.mark.skipif(not REPEATS.is_file(), reason=f"the MedQuAD subset is not at {MEDQUAD} (../shared is absent)")
def test_medquad_answers_all_become_facts(tmp_path, tiny_base):
    from agentpeft.models import load_tokenizer
    from agentpeft.pipeline.dataset import build_dataset
    from agentpeft.pipeline.ingest import ingest

    recipe = get_recipes()["medical-qa"]
    recipe = recipe.model_copy(update={
        "data": recipe.data.model_copy(update={"generators": ["qa"], "auto_generators": False, "general": 0}),
        "train": recipe.train.model_copy(update={"max_seq_len": 512})})
    docs = ingest(REPEATS, ["medquad"])
    result = build_dataset(docs, ["qa"], load_tokenizer(tiny_base), recipe.system_prompt, tmp_path / "out",
                           recipe.data.train_phrasings, 512, recipe=recipe)
    card = result.card
    held_out = [json.loads(line) for line in (tmp_path / "out" / "eval.jsonl").read_text().splitlines()]
    dedup, length = card["notes"]["dedup"], card["notes"]["length"]
    assert card["generated"] == {"qa": len(docs)} and dedup["questions_made_distinct"] >= 5
    assert length["split"]["answers"] >= 1 and not length["dropped"].get("no part of the answer fits")
    # Every answer is a fact (or several, once split) with its own held-out question, unless it repeats another.
    dropped = {e["source"] for e in dedup["examples"]}
    assert sum(dedup["dropped"].values()) == len(dropped)
    sources = {f"{d.metadata['source']}:{d.metadata['line']}" for d in docs}
    assert {r["source"] for r in held_out} == sources - dropped
    assert card["facts"] == len(held_out) == len({r["question"] for r in held_out}) > len(docs)
    assert all(r["answer"].endswith(medical.SAFETY_NOTE) for r in held_out)
