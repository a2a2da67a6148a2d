"""The generated references (docs/cli.md, docs/recipe-reference.md) match the code they come from."""

from __future__ import annotations

import difflib
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gen_docs.py"


def _gen_docs():
    spec = importlib.util.spec_from_file_location("gen_docs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen_docs = _gen_docs()


@pytest.mark.parametrize("path", list(gen_docs.generated()), ids=lambda p: p.name)
def test_generated_reference_is_current(path: Path):
    expected = gen_docs.generated()[path]
    actual = path.read_text(encoding="utf-8") if path.is_file() else ""
    if actual != expected:
        diff = "".join(list(difflib.unified_diff(actual.splitlines(True), expected.splitlines(True),
                                                 "committed", "generated"))[:40])
        pytest.fail(f"{path.relative_to(gen_docs.ROOT)} is stale: regenerate it with `{gen_docs.REGENERATE}` "
                    f"and commit the result.\n{diff}")


def test_every_command_option_and_recipe_field_is_documented():
    """Help texts and field descriptions are the references' source: none may be missing."""
    import click
    from pydantic import BaseModel

    from agentpeft.cli import cli
    from agentpeft.recipe import Recipe

    missing = []
    for path, command in gen_docs._commands(cli, ["agentpeft"]):
        if not command.help:
            missing.append(" ".join(path))
        missing += [f"{' '.join(path)} {p.opts[0]}" for p in command.params
                    if isinstance(p, click.Option) and not p.hidden and not p.help]
    for section, model in gen_docs._model_sections(Recipe, ""):
        missing += [f"recipe field {section + '.' if section else ''}{name}" for name, field in model.model_fields.items()
                    if not field.exclude and not field.description]
        assert issubclass(model, BaseModel)
    assert not missing, f"add help= / Field(description=...) for: {', '.join(missing)}"
