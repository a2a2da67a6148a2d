"""Bad input gives one clear line, a non-zero exit, no traceback, and nothing in the registry."""

import pytest
from click.testing import CliRunner

from agentpeft.cli import cli
from agentpeft.registry import registry_dir


@pytest.mark.parametrize("args, message", [
    (["build", "no-such-recipe"], "unknown recipe 'no-such-recipe'"),
    (["build", "support-bot", "--kb", "/no/such/folder"], "does not exist"),
    (["build", "support-bot", "--kb", "{empty}"], "holds no file"),
    (["build", "support-bot", "--base", "/no/such/model"], "base model '/no/such/model' not found"),
    (["build", "support-bot", "--base", "{empty}"], "has no config.json"),
    (["build", "support-bot", "--base", "nobody/no-such-model"], "could not be fetched from the hub"),
    (["build", "support-bot", "--name", "../escape"], "invalid model name"),
    (["build", "support-bot", "--general", "500"], "--general: Input should be less than or equal to 202"),
    (["build", "support-bot", "--train-phrasings", "0"], "--train-phrasings: Input should be greater than or equal to 1"),
    (["build", "support-bot", "--system-prompt", "  "], "--system-prompt is empty"),
    (["build", "support-bot", "--loraplus-lr-ratio", "0.5"], "--loraplus-lr-ratio: Input should be greater than or"),
    (["show", "ghost"], "no model named 'ghost'"),
    (["models", "pull", "gpt-99"], "unknown model alias"),
])
def test_bad_input_is_one_line(home, tmp_path, monkeypatch, args, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "empty").mkdir()
    args = [a.replace("{empty}", str(tmp_path / "empty")) for a in args]
    args += ["--quiet"] if args[0] == "build" else []
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.output
    assert "Traceback" not in result.output
    assert not registry_dir().exists() or not any(registry_dir().rglob("manifest.json"))


def test_every_command_has_help():
    runner = CliRunner()
    for args in ([], ["build"], ["models"], ["models", "pull"], ["recipes"], ["recipes", "show"], ["list"],
                 ["show"], ["plugins"]):
        result = runner.invoke(cli, [*args, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output, args


def test_recipes_lists_support_bot():
    result = CliRunner().invoke(cli, ["recipes"])
    assert result.exit_code == 0 and "support-bot  [agentpeft (built-in)]  Customer-support" in result.output
