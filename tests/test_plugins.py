"""Third-party plugins use the same hooks as the built-ins; a broken one is reported, not fatal."""

import importlib
import types

from click.testing import CliRunner

from agentpeft import plugins
from agentpeft.hookspecs import hookimpl
from agentpeft.recipe import Recipe, get_recipes


class _EntryPoint:
    def __init__(self, name, target):
        self.name, self._target, self.dist = name, target, None

    def load(self):
        if isinstance(self._target, Exception):
            raise self._target
        return self._target


def test_entry_point_plugins_register_recipes_and_broken_ones_are_reported(monkeypatch, tmp_path):
    plugin = types.ModuleType("acme_plugin")

    @hookimpl
    def register_recipes(register):
        register(Recipe(name="acme-hr", system_prompt="You answer HR questions.", knowledge_base=tmp_path))

    plugin.register_recipes = register_recipes
    eps = [_EntryPoint("acme", plugin), _EntryPoint("broken", ImportError("No module named 'nothing'"))]
    monkeypatch.setattr(plugins, "entry_points", lambda group: eps)
    monkeypatch.setattr(plugins, "_loaded", False)
    monkeypatch.setattr(plugins, "failed_plugins", {})
    for name in plugins.DEFAULT_PLUGINS:
        plugins.pm.unregister(name=name)
    try:
        assert "acme-hr" in get_recipes() and "support-bot" in get_recipes()
        assert "broken" in plugins.failed_plugins
        from agentpeft.cli import cli

        out = CliRunner().invoke(cli, ["plugins"]).output
        assert "acme" in out and "FAILED broken" in out
    finally:
        plugins.pm.unregister(name="acme")


def test_disable_plugins_env(monkeypatch):
    monkeypatch.setenv("AGENTPEFT_DISABLE_PLUGINS", "1")
    assert plugins._disabled() is True
    monkeypatch.setenv("AGENTPEFT_DISABLE_PLUGINS", "a, b")
    assert plugins._disabled() == {"a", "b"}


def test_example_plugin_package_registers_its_metric(monkeypatch):
    """plugins/agentpeft-length-metric, loaded the way its entry point would load it."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "plugins" / "agentpeft-length-metric"))
    module = importlib.import_module("agentpeft_length_metric")
    monkeypatch.setattr(plugins, "entry_points", lambda group: [_EntryPoint("length_metric", module)])
    monkeypatch.setattr(plugins, "_loaded", False)
    try:
        from agentpeft.pipeline.evaluate import get_metrics

        metric = get_metrics()["length_ratio"]
        assert metric.score(["a b c d"], [{"answer": "a b"}]) == 2.0 and not metric.higher_is_better
    finally:
        plugins.pm.unregister(name="length_metric")


class _Dist:
    name, version = "acme-agentpeft", "1.2.0"


def _fresh_plugins(monkeypatch, eps):
    """A new plugin manager that sees only ``eps`` (not the plugin packages CI pip-installs)."""
    import pluggy

    from agentpeft import hookspecs

    fresh = pluggy.PluginManager("agentpeft")
    fresh.add_hookspecs(hookspecs)
    monkeypatch.setattr(plugins, "pm", fresh)
    monkeypatch.setattr(plugins, "entry_points", lambda group: eps)
    monkeypatch.setattr(plugins, "_loaded", False)
    monkeypatch.setattr(plugins, "failed_plugins", {})
    monkeypatch.setattr(plugins, "disabled_plugins", [])
    monkeypatch.setattr(plugins, "plugin_packages", {})


def _acme_and_evil(tmp_path):
    acme = types.ModuleType("acme_plugin")

    @hookimpl
    def register_recipes(register):
        register(Recipe(name="acme-hr", system_prompt="You answer HR questions.", knowledge_base=tmp_path))

    acme.register_recipes = register_recipes
    good = _EntryPoint("acme", acme)
    good.dist = _Dist()
    # Loading this one would record a failure: a disabled plugin must never be imported at all.
    evil = _EntryPoint("evil", RuntimeError("imported although disabled"))
    return [good, evil]


def test_plugins_command_lists_each_plugin_with_its_package(monkeypatch, tmp_path):
    monkeypatch.delenv("AGENTPEFT_DISABLE_PLUGINS", raising=False)
    _fresh_plugins(monkeypatch, _acme_and_evil(tmp_path)[:1])
    try:
        from agentpeft.cli import cli

        out = CliRunner().invoke(cli, ["plugins"]).output
        for name in plugins.DEFAULT_PLUGINS:
            assert f"{name}  (agentpeft (built-in))" in out
        assert "acme  (acme-agentpeft 1.2.0)  hooks: register_recipes" in out
    finally:
        plugins.pm.unregister(name="acme")


def test_disable_plugins_by_name_skips_only_those(monkeypatch, tmp_path):
    monkeypatch.setenv("AGENTPEFT_DISABLE_PLUGINS", "evil")
    _fresh_plugins(monkeypatch, _acme_and_evil(tmp_path))
    try:
        assert "acme-hr" in get_recipes()
        assert plugins.disabled_plugins == ["evil"] and plugins.failed_plugins == {}
        from agentpeft.cli import cli

        out = CliRunner().invoke(cli, ["plugins"]).output
        assert "DISABLED evil (AGENTPEFT_DISABLE_PLUGINS)" in out and "acme  (acme-agentpeft" in out
    finally:
        plugins.pm.unregister(name="acme")


def test_disable_plugins_1_keeps_only_the_built_ins(monkeypatch, tmp_path):
    monkeypatch.setenv("AGENTPEFT_DISABLE_PLUGINS", "1")
    _fresh_plugins(monkeypatch, _acme_and_evil(tmp_path))
    recipes = get_recipes()
    assert "acme-hr" not in recipes and "support-bot" in recipes
    assert sorted(plugins.disabled_plugins) == ["acme", "evil"] and plugins.failed_plugins == {}
    assert {p["name"] for p in plugins.get_plugins()} == set(plugins.DEFAULT_PLUGINS)
