import pytest

from agentpeft import registry
from agentpeft.errors import AgentpeftError


def _publish(tmp_path, name="bot"):
    src = tmp_path / "adapter"
    src.mkdir(exist_ok=True)
    (src / "w.bin").write_text("x")
    manifest = {"recipe": "r", "base_model": {"name": "b", "sha256": "0" * 64}, "agentpeft_version": "0",
                "created": "now", "dataset": {"facts": 1, "splits": {"train": 1, "eval": 1}, "hash": "0" * 64},
                "train": {"config": {"method": "qlora"}}, "merge": {"max_logit_diff": 0.0},
                "metrics": {"primary": "accuracy", "base": {"accuracy": 0.0}, "tuned": {"accuracy": 1.0}}}
    return registry.publish(name, {"adapter": src}, manifest)


def test_versions_and_refs(home, tmp_path):
    assert _publish(tmp_path)[0] == 1
    assert _publish(tmp_path)[0] == 2
    assert registry.resolve("bot").name == "2"
    assert registry.resolve("bot@1").name == "1"
    assert registry.show("bot")["version"] == 2
    assert (registry.resolve("bot") / "README.md").read_text().startswith("---\nbase_model: b")
    assert [r["versions"] for r in registry.list_models()] == [[1, 2]]
    with pytest.raises(AgentpeftError, match="no version 9"):
        registry.resolve("bot@9")


@pytest.mark.parametrize("name", ["../x", "/abs", "", "a/b", "UPPER", "..", "a" * 65])
def test_bad_names_are_refused(name):
    with pytest.raises(AgentpeftError, match="invalid model name"):
        registry.check_name(name)


def test_failed_publish_leaves_nothing(home, tmp_path):
    with pytest.raises(FileNotFoundError):
        registry.publish("bot", {"adapter": tmp_path / "missing"}, {})
    assert registry.versions("bot") == []
    assert not [p for p in (registry.registry_dir() / "bot").iterdir() if p.name != ".lock"]


def test_unknown_model(home):
    with pytest.raises(AgentpeftError, match="no model named 'ghost'"):
        registry.resolve("ghost")


def test_rm_and_export(home, tmp_path):
    from click.testing import CliRunner

    from agentpeft.cli import cli

    _publish(tmp_path)
    _publish(tmp_path)
    runner = CliRunner()
    exported = runner.invoke(cli, ["export", "bot@1", str(tmp_path / "out")])
    assert exported.exit_code == 0 and (tmp_path / "out" / "manifest.json").is_file()
    again = runner.invoke(cli, ["export", "bot@1", str(tmp_path / "out")])
    assert again.exit_code == 1 and "not empty" in again.output
    assert runner.invoke(cli, ["rm", "bot@1", "--yes"]).exit_code == 0
    assert registry.versions("bot") == [2]
    assert runner.invoke(cli, ["rm", "bot", "--yes"]).exit_code == 0
    assert registry.versions("bot") == []
    assert not [p for p in (registry.registry_dir() / "bot").iterdir() if p.name != ".lock"]
