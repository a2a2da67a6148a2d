"""plugins/agentpeft-hr-policy, a third-party recipe plugin: registered through its entry point, built end to end."""

import importlib
import json
from pathlib import Path

from click.testing import CliRunner

from agentpeft.cli import cli

PACKAGE = Path(__file__).resolve().parents[1] / "plugins" / "agentpeft-hr-policy"


def test_hr_policy_plugin_builds_end_to_end(monkeypatch, install_plugin, tiny_base, home):
    monkeypatch.syspath_prepend(str(PACKAGE))
    install_plugin(importlib.import_module("agentpeft_hr_policy"), "hr-policy", "agentpeft-hr-policy")
    runner = CliRunner()
    assert "hr-policy  [agentpeft-hr-policy 0.1.0]" in runner.invoke(cli, ["recipes"]).output
    built = runner.invoke(cli, ["build", "hr-policy", "--base", str(tiny_base), "--max-steps", "2",
                                "--allow-regression", "--quiet"])
    assert built.exit_code == 0, built.output
    manifest = json.loads((home / "registry" / "hr-policy" / "1" / "manifest.json").read_text())
    assert manifest["recipe"] == "hr-policy" and manifest["dataset"]["facts"] == 27
    assert manifest["knowledge_base"] == str(PACKAGE / "agentpeft_hr_policy" / "kb")
