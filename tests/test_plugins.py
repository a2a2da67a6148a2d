"""Third-party plugins use the same hooks as the built-ins; a broken one is reported, not fatal."""

import importlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from click.testing import CliRunner

from agentpeft import plugins
from agentpeft.hookspecs import hookimpl
from agentpeft.recipe import Recipe, get_recipes


class _EntryPoint:
    def __init__(self, name, target):
        self.name, self._target, self.dist = name, target, None

    def load(self):
        if isinstance(self._target, BaseException):
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
    monkeypatch.setattr(plugins, "pm", plugins.new_plugin_manager())
    monkeypatch.setattr(plugins, "entry_points", lambda group: eps)
    monkeypatch.setattr(plugins, "_loaded", False)
    monkeypatch.setattr(plugins, "failed_plugins", {})
    monkeypatch.setattr(plugins, "hook_failures", {})
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


class _Broken:
    """A plugin whose every hook fails, one of them after registering a recipe, one by calling sys.exit."""

    def __init__(self, kb):
        self.kb = kb

    @hookimpl
    def register_recipes(self, register):
        register(Recipe(name="half-registered", system_prompt="You help.", knowledge_base=self.kb))
        raise RuntimeError("recipes\nbroke")

    @hookimpl
    def register_metrics(self, register):
        raise SystemExit(3)

    @hookimpl
    def register_commands(self, cli):
        raise ValueError("commands broke")


def test_a_plugin_whose_hooks_raise_is_reported_and_the_others_keep_working(monkeypatch, tmp_path, caplog):
    import click

    from agentpeft.cli import cli
    from agentpeft.pipeline.evaluate import get_metrics

    _fresh_plugins(monkeypatch, _acme_and_evil(tmp_path)[:1])
    plugins.load_plugins()
    plugins.pm.register(_Broken(tmp_path), "broken")
    recipes = get_recipes()
    assert "acme-hr" in recipes and "support-bot" in recipes
    assert "half-registered" not in recipes  # what a failing hook registered before raising is dropped
    assert "accuracy" in get_metrics()
    group = click.Group()
    plugins.pm.hook.register_commands(cli=group)  # recorded, not raised
    assert plugins.failed_plugins["broken"] == ("register_recipes raised RuntimeError: recipes broke; "
                                                "register_metrics raised SystemExit: 3; "
                                                "register_commands raised ValueError: commands broke")
    assert sum("plugin 'broken' failed in register_recipes" in r.getMessage() for r in caplog.records) == 1
    result = CliRunner().invoke(cli, ["plugins"])
    assert result.exit_code == 0, result.output
    assert "FAILED broken: register_recipes raised RuntimeError: recipes broke;" in result.output
    assert "acme  (acme-agentpeft 1.2.0)" in result.output


def test_plugins_lists_a_hook_failure_no_command_has_triggered_yet(monkeypatch, tmp_path):
    from agentpeft.cli import cli

    _fresh_plugins(monkeypatch, [])
    plugins.load_plugins()
    plugins.pm.register(_Broken(tmp_path), "broken")
    result = CliRunner().invoke(cli, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    assert "register_recipes raised RuntimeError" in json.loads(result.output)["failed"]["broken"]


@pytest.mark.parametrize("error", [SystemExit("no config, bye"), SystemExit(2), GeneratorExit("odd"),
                                   RuntimeError("boom")])
def test_an_entry_point_whose_import_raises_systemexit_is_reported(monkeypatch, tmp_path, error):
    from agentpeft.cli import cli

    _fresh_plugins(monkeypatch, [*_acme_and_evil(tmp_path)[:1], _EntryPoint("exits", error)])
    assert "acme-hr" in get_recipes() and "support-bot" in get_recipes()
    assert plugins.failed_plugins == {"exits": plugins._one_line(error)}
    result = CliRunner().invoke(cli, ["plugins"])
    assert result.exit_code == 0 and f"FAILED exits: {type(error).__name__}" in result.output


def test_keyboard_interrupt_in_a_plugin_is_not_swallowed(monkeypatch, tmp_path):
    _fresh_plugins(monkeypatch, [_EntryPoint("interrupted", KeyboardInterrupt())])
    with pytest.raises(KeyboardInterrupt):
        plugins.load_plugins()


BROKEN_AT_IMPORT = """
import sys
from agentpeft import plugins
from agentpeft.hookspecs import hookimpl

class Broken:
    @hookimpl
    def register_commands(self, cli):
        raise RuntimeError("commands broke")

    @hookimpl
    def register_recipes(self, register):
        sys.exit("recipes called sys.exit")

plugins.pm.register(Broken(), "broken")
from agentpeft.cli import cli
cli(sys.argv[1:])
"""


@pytest.mark.parametrize("args, expected", [(["--help"], "Usage:"), (["plugins"], "FAILED broken"),
                                            (["recipes"], "support-bot")])
def test_a_broken_plugin_registered_before_the_cli_loads_breaks_no_command(args, expected, tmp_path):
    env = {**os.environ, "AGENTPEFT_HOME": str(tmp_path / "home"), "AGENTPEFT_DISABLE_PLUGINS": "1"}
    result = subprocess.run([sys.executable, "-c", BROKEN_AT_IMPORT, *args], capture_output=True, text=True,
                            env=env, cwd=Path(__file__).parents[1], timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert expected in result.stdout and "Traceback" not in result.stderr
