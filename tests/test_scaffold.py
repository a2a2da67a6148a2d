"""`agentpeft recipes new`: the scaffolded plugin package registers its recipe and builds as it comes."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from agentpeft.cli import cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def acme(tmp_path, monkeypatch):
    """`agentpeft recipes new acme-hr --dir TMP`, its module importable."""
    result = CliRunner().invoke(cli, ["recipes", "new", "acme-hr", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    package = tmp_path / "acme-hr"
    monkeypatch.syspath_prepend(str(package))
    monkeypatch.delitem(sys.modules, "agentpeft_acme_hr", raising=False)
    yield package
    sys.modules.pop("agentpeft_acme_hr", None)


def test_scaffold_layout(acme):
    files = sorted(str(p.relative_to(acme)) for p in acme.rglob("*") if p.is_file())
    assert files == ["README.md", "agentpeft_acme_hr/__init__.py", "agentpeft_acme_hr/kb/facts.md",
                     "agentpeft_acme_hr/kb/faq.md", "agentpeft_acme_hr/recipe.yaml", "pyproject.toml",
                     "tests/test_recipe.py"]
    pyproject = (acme / "pyproject.toml").read_text()
    assert '[project.entry-points.agentpeft]\nacme-hr = "agentpeft_acme_hr"' in pyproject
    assert 'build-backend = "hatchling.build"' in pyproject
    recipe = yaml.safe_load((acme / "agentpeft_acme_hr" / "recipe.yaml").read_text())
    assert recipe["name"] == "acme-hr" and "Acme HR" in recipe["system_prompt"]
    assert "## When is the Acme HR help desk open?" in (acme / "agentpeft_acme_hr" / "kb" / "faq.md").read_text()


def test_scaffolded_plugin_registers_lists_and_builds(acme, install_plugin, tiny_base, home):
    install_plugin(importlib.import_module("agentpeft_acme_hr"), "acme-hr", "agentpeft-acme-hr")
    runner = CliRunner()
    listed = runner.invoke(cli, ["recipes"])
    assert "acme-hr  [agentpeft-acme-hr 0.1.0]" in listed.output
    assert "support-bot  [agentpeft (built-in)]" in listed.output
    shown = runner.invoke(cli, ["recipes", "show", "acme-hr"])
    assert str(acme / "agentpeft_acme_hr" / "kb") in shown.output
    built = runner.invoke(cli, ["build", "acme-hr", "--base", str(tiny_base), "--max-steps", "2",
                                "--allow-regression", "--quiet"])
    assert built.exit_code == 0, built.output
    assert "Registered acme-hr@1" in built.output
    card = (home / "registry" / "acme-hr" / "1" / "dataset_card.md").read_text()
    assert "'faq': 4" in card and "'facts': 4" in card


def test_scaffolded_tests_pass_as_they_come(acme):
    """The package's own tests/test_recipe.py, run by pytest in the package folder."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(acme)]), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=acme,
                         env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "2 passed" in run.stdout


@pytest.mark.parametrize("args, message", [
    (["Bad_Name"], "must be lower-case letters"),
    (["support-bot"], "already registered"),
])
def test_recipes_new_refuses_bad_names(tmp_path, args, message):
    result = CliRunner().invoke(cli, ["recipes", "new", *args, "--dir", str(tmp_path)])
    assert result.exit_code == 1 and message in result.output
    assert list(tmp_path.iterdir()) == []


def test_recipes_new_refuses_an_existing_folder(tmp_path):
    (tmp_path / "acme-hr").mkdir()
    (tmp_path / "acme-hr" / "mine.txt").write_text("keep me")
    result = CliRunner().invoke(cli, ["recipes", "new", "acme-hr", "--dir", str(tmp_path)])
    assert result.exit_code == 1 and "already exists" in result.output
    assert [p.name for p in (tmp_path / "acme-hr").iterdir()] == ["mine.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acme-hr"]  # no staging folder left behind
