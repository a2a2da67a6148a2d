"""tech-docs: agentpeft's own docs as the knowledge base (from a checkout and from a wheel), doc_lookup."""

import shutil
import tomllib
from pathlib import Path

import pytest

from agentpeft.default_plugins.loaders import load_markdown
from agentpeft.default_plugins.tech_docs import DocIndex, doc_lookup_tool
from agentpeft.pipeline.dataset import get_generators
from agentpeft.pipeline.ingest import ingest
from agentpeft.recipe import Recipe, get_recipes

ROOT = Path(__file__).resolve().parents[1]


def test_knowledge_base_is_the_docs_folder_with_the_readme():
    recipe = get_recipes()["tech-docs"]
    assert recipe.kb_path.resolve() == ROOT / "docs"
    assert (recipe.kb_path / "README.md").read_text() == (ROOT / "README.md").read_text()
    assert recipe.tools == ["doc_lookup"] and recipe.data.loaders is None


def test_knowledge_base_resolves_inside_the_wheel_layout(tmp_path):
    """pyproject's force-include maps recipes/ and docs/ into the package; the relative path still lands on docs."""
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"][
        "force-include"]
    for source, target in mapping.items():
        shutil.copytree(ROOT / source, tmp_path / target)
    recipe = Recipe.from_file(tmp_path / mapping["recipes"] / "tech-docs" / "recipe.yaml")
    assert recipe.kb_path.resolve() == (tmp_path / mapping["docs"]).resolve()
    assert (recipe.kb_path / "faq.md").is_file() and (recipe.kb_path / "README.md").is_file()


def test_faq_gives_about_thirty_pairs_with_key_facts():
    pairs = list(get_generators()["faq"].generate(load_markdown(ROOT / "docs" / "faq.md")))
    assert len(pairs) >= 30 and all(p.key for p in pairs)
    assert any("`agentpeft recipes new NAME`" in p.answer for p in pairs)


@pytest.fixture(scope="module")
def index():
    return DocIndex(ingest(ROOT / "docs", ["markdown"]))


def test_doc_lookup_by_heading_and_api_name(index):
    hit = index.lookup("how do I list the recipes")
    assert hit[0]["heading"] == "How do I list the recipes?" and "agentpeft recipes" in hit[0]["text"]
    by_api = index.lookup("register_tools")
    assert by_api and by_api[0]["heading"] == "`register_tools(register, recipe, model)`"
    assert "StructuredTool" in by_api[0]["text"]  # code blocks come back intact
    assert any("load_llm" in h["text"] for h in index.lookup("load_llm()"))
    assert index.lookup("no such thing at all") == []


def test_doc_lookup_tool_answers_and_suggests(tmp_path):
    (tmp_path / "guide.md").write_text("# Guide\n\n## Install\n\nRun `pip install acme`.\n\n```bash\npip install acme\n```\n")
    tool = doc_lookup_tool(tmp_path)
    assert tool.name == "doc_lookup" and set(tool.args) == {"query"}
    found = tool.invoke({"query": "Install"})
    assert found.startswith("Install (") and "```bash\npip install acme\n```" in found
    assert "Close matches: install" in tool.invoke({"query": "instal"})


def test_doc_lookup_is_registered_for_tech_docs():
    from agentpeft.langchain import collect_tools

    assert "doc_lookup" in {t.name for t in collect_tools(get_recipes()["tech-docs"])}


def test_tech_docs_builds_on_the_tiny_model(tiny_base, home):
    from agentpeft.pipeline.build import build

    result = build("tech-docs", base=str(tiny_base), max_steps=2, allow_regression=True, show_progress=False,
                   log=lambda s: None)
    assert result.version == 1 and result.eval.primary == "accuracy"
