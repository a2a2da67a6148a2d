"""The hr-policy recipe is registered, its knowledge base yields its pairs, and it builds on a tiny offline model."""

import agentpeft
from agentpeft.default_plugins.loaders import load_markdown
from agentpeft.pipeline.dataset import get_generators
from agentpeft import Recipe
from agentpeft.testing import make_tiny_base

import agentpeft_hr_policy as plugin

KB = plugin.RECIPE.parent / "kb"


def test_recipe_is_registered_and_valid():
    registered = []
    plugin.register_recipes(registered.append)
    recipe = Recipe.from_file(registered[0])
    assert recipe.name == "hr-policy" and recipe.kb_path.is_dir()
    assert recipe.eval.primary in recipe.eval.metrics


def test_knowledge_base_yields_every_policy_with_its_key_fact():
    docs = [d for p in sorted(KB.glob("*.md")) for d in load_markdown(p)]
    faq = list(get_generators()["faq"].generate(docs))
    facts = list(get_generators()["facts"].generate(docs))
    assert len(faq) == 22 and all(p.key for p in faq) and len(facts) == 5
    assert any(p.key == "27 days" for p in faq)


def test_recipe_builds_on_a_tiny_model(tmp_path, monkeypatch):
    monkeypatch.setenv("AGENTPEFT_HOME", str(tmp_path / "home"))
    base = make_tiny_base(tmp_path / "base", [p.read_text(encoding="utf-8") for p in KB.rglob("*.md")])
    result = agentpeft.build(str(plugin.RECIPE), base=str(base), max_steps=2, allow_regression=True,
                             show_progress=False, log=lambda line: None)
    assert result.version == 1 and (result.path / "manifest.json").is_file()
