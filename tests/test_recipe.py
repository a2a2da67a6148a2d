from pathlib import Path

import pytest

from agentpeft.errors import AgentpeftError
from agentpeft.recipe import configure
from agentpeft.recipe import Recipe, get_recipe, get_recipes


def test_builtin_support_bot_is_registered_and_valid():
    recipe = get_recipes()["support-bot"]
    assert recipe.train.method == "qlora"
    assert recipe.kb_path.is_dir()
    assert recipe.eval.primary in recipe.eval.metrics


def test_unknown_recipe_names_the_fix():
    with pytest.raises(AgentpeftError, match="unknown recipe 'nope'.*agentpeft recipes"):
        get_recipe("nope")


@pytest.mark.parametrize("body, field", [
    ("name: x\nsystem_prompt: hi\ntrain:\n  lr: fast\n", "train.lr"),
    ("name: x\nsystem_prompt: hi\ncolour: blue\n", "colour"),
    ("name: x\n", "system_prompt"),
    ("name: x\nsystem_prompt: hi\neval:\n  metrics: [accuracy]\n  primary: bleu\n", "eval.primary"),
])
def test_bad_recipe_file_names_the_field(tmp_path, body, field):
    path = tmp_path / "recipe.yaml"
    path.write_text(body)
    with pytest.raises(AgentpeftError, match=f"field '{field}'"):
        Recipe.from_file(path)


def test_recipe_file_path_and_overrides(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("name: mine\nsystem_prompt: hi\nknowledge_base: docs\n")
    recipe = configure(str(path), base="some/base", epochs=2, max_steps=5)
    assert recipe.kb_path == tmp_path / "docs"
    assert (recipe.base_model, recipe.train.epochs, recipe.train.max_steps) == ("some/base", 2, 5)
    assert configure(str(path), kb=tmp_path).kb_path == Path(tmp_path)
    assert get_recipe(str(tmp_path)).name == "mine"


def test_a_folder_without_recipe_yaml_is_an_unknown_recipe(tmp_path):
    with pytest.raises(AgentpeftError, match="unknown recipe .*folder that holds one"):
        get_recipe(str(tmp_path))


def test_top_level_api_has_the_cli_verbs():
    import agentpeft
    from agentpeft.pipeline.build import build

    assert agentpeft.build is build
    for verb in ("evaluate_model", "pull_model", "list_models", "show", "remove", "export", "write_report", "load_llm"):
        assert callable(getattr(agentpeft, verb))


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_infinite_or_nan_settings_are_refused(value):
    from agentpeft.errors import AgentpeftError
    from agentpeft.recipe import configure

    with pytest.raises((AgentpeftError, ValueError)):
        configure("support-bot", lr=float(value))
