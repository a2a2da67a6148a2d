"""The bad-input corpus: hostile or clumsy command lines, each run through the real CLI in process.

Every case ends in one line ``Error: ...`` naming the problem (exit 1; click's own usage errors exit 2
with their usage lines above the one ``Error:`` line) or in the documented safe behaviour its row
names, never in a traceback. After each case the registry (a published ``bot@1``) is byte for byte what
it was, and nothing was written outside AGENTPEFT_HOME: the work folder the command runs in, the rest of
the test's folder and the temporary folder are as they were. No case loads or trains a model. The
table in docs/reliability.md points here.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
from click.testing import CliRunner

from agentpeft import registry
from agentpeft.cli import cli

RECIPE = "name: bad-bot\nsystem_prompt: You help.\nknowledge_base: kb\n"


@dataclass
class Case:
    id: str
    args: list[str]
    expect: str  # a fragment of the Error line (or, with exit 0, of the output)
    exit: int = 1
    files: dict[str, str | bytes] = field(default_factory=dict)  # written under the work folder first
    links: dict[str, str] = field(default_factory=dict)  # work-relative link -> target ("{outside}" allowed)
    env: dict[str, str] = field(default_factory=dict)
    setup: Callable[[Path], None] | None = None  # given AGENTPEFT_HOME, before the snapshot


def _foreign_manifest(home: Path) -> None:
    (home / "registry" / "other" / "1").mkdir(parents=True)
    (home / "registry" / "other" / "1" / "manifest.json").write_text("{not json")


KB = {"kb/faq.md": "## How long is the warranty?\n\nTwo years.\n"}
BOMB = "qa: &qa\n  - question: Q?\n    answer: A.\nseed_examples:\n" + "".join("  - *qa\n" for _ in range(20))

CASES = [
    # Registry references and names
    Case("show-version-0", ["show", "bot@0"], "invalid version '0'"),
    Case("rm-version-0", ["rm", "bot@0", "--yes"], "invalid version '0'"),
    Case("show-version-00", ["show", "bot@00"], "invalid version '00'"),
    Case("show-version-superscript", ["show", "bot@²"], "invalid version"),
    Case("show-version-arabic-digit", ["show", "bot@٢"], "invalid version"),
    Case("show-version-newline", ["show", "bot@1\n"], "invalid version"),
    Case("show-version-word", ["show", "bot@two"], "invalid version 'two'"),
    Case("show-version-5000-digits", ["show", "bot@" + "9" * 5000], "invalid version"),
    Case("show-path-name", ["show", "../x"], "invalid model name '../x'"),
    Case("rm-slash-name", ["rm", "a/b", "--yes"], "invalid model name 'a/b'"),
    Case("show-upper-case", ["show", "Bot"], "invalid model name 'Bot'"),
    Case("show-device-name", ["show", "con"], "reserved device name"),
    Case("show-trailing-newline", ["show", "bot\n"], "invalid model name"),
    Case("show-unknown", ["show", "nosuch"], "no model named 'nosuch'"),
    Case("rm-unknown", ["rm", "nosuch", "--yes"], "no model named 'nosuch'"),
    Case("report-unknown", ["report", "nosuch", "--no-open"], "no model named 'nosuch'"),
    Case("serve-version-0", ["serve", "bot@0"], "invalid version '0'"),
    Case("serve-port-out-of-range", ["serve", "bot", "--port", "70000"], "70000 is not in the range", exit=2),
    Case("build-name-path", ["build", "support-bot", "--name", "../x", "--quiet"], "invalid model name '../x'"),
    Case("build-name-dot", ["build", "support-bot", "--name", "bot.", "--quiet"], "invalid model name 'bot.'"),
    # export targets
    Case("export-into-registry", ["export", "bot@1", "{home}/registry/bot/7"], "inside the registry"),
    Case("export-into-its-source", ["export", "bot@1", "{home}/registry/bot/1/copy"], "inside the version being copied"),
    Case("export-into-non-empty-folder", ["export", "bot@1", "{work}/full"], "not empty",
         files={"full/keep.txt": "mine"}),
    Case("export-unknown-format", ["export", "bot@1", "{work}/out", "--format", "zip"], "zip"),
    # knowledge bases
    Case("kb-missing", ["data", "support-bot", "--kb", "{work}/no-such"], "does not exist"),
    Case("kb-empty-string", ["build", "support-bot", "--kb", "", "--quiet"], "--kb is empty"),
    Case("kb-no-readable-file", ["data", "support-bot", "--kb", "{work}/kb"], "holds no file that the loaders read",
         files={"kb/image.png": b"\x89PNG"}),
    Case("kb-only-binary-and-empty", ["data", "support-bot", "--kb", "{work}/kb"], "is empty: its files hold no text",
         files={"kb/a.md": b"\x00\x01\x02", "kb/b.md": ""}),
    Case("kb-strict-binary", ["data", "support-bot", "--kb", "{work}/kb", "--strict"], "cannot be read",
         files={**KB, "kb/bin.md": b"\x00\x00"}),
    Case("kb-strict-yaml-aliases", ["data", "support-bot", "--kb", "{work}/kb", "--strict"],
         "more than 16 YAML aliases", files={**KB, "kb/qna.yaml": BOMB}),
    Case("kb-only-links-out", ["data", "support-bot", "--kb", "{work}/kb"], "symbolic link(s) out of it, skipped",
         links={"kb/passwd.md": "{outside}/passwd.md"}),
    Case("kb-fifo-strict", ["data", "support-bot", "--kb", "{work}/kb", "--strict"], "not a regular file",
         files=KB),
    Case("max-file-mb-not-a-number", ["data", "support-bot", "--kb", "{work}/kb"], "AGENTPEFT_MAX_FILE_MB='lots'",
         files=KB, env={"AGENTPEFT_MAX_FILE_MB": "lots"}),
    # recipe files
    Case("recipe-unknown", ["data", "no-such-recipe"], "unknown recipe 'no-such-recipe'"),
    Case("recipe-show-unknown", ["recipes", "show", "no-such-recipe"], "unknown recipe"),
    Case("recipe-unknown-key", ["data", "{work}/r.yaml"], "field 'colour'", files={"r.yaml": RECIPE + "colour: blue\n"}),
    Case("recipe-wrong-type", ["data", "{work}/r.yaml"], "field 'train.r'", files={"r.yaml": RECIPE + "train:\n  r: big\n"}),
    Case("recipe-inf", ["data", "{work}/r.yaml"], "field 'train.lr'", files={"r.yaml": RECIPE + "train:\n  lr: .inf\n"}),
    Case("recipe-primary-not-a-metric", ["data", "{work}/r.yaml"], "field 'eval.primary'",
         files={"r.yaml": RECIPE + "eval:\n  metrics: [accuracy]\n  primary: bleu\n"}),
    Case("recipe-malformed-yaml", ["data", "{work}/r.yaml"], "invalid YAML", files={"r.yaml": "name: [unclosed\n"}),
    Case("recipe-empty-file", ["data", "{work}/r.yaml"], "must hold a mapping", files={"r.yaml": ""}),
    Case("recipe-a-list", ["data", "{work}/r.yaml"], "must hold a mapping of fields, not list",
         files={"r.yaml": "- just\n- a list\n"}),
    Case("recipe-not-utf8", ["data", "{work}/r.yaml"], "r.yaml", files={"r.yaml": b"name: caf\xe9\n"}),
    Case("recipe-bad-name", ["data", "{work}/r.yaml"], "field 'name'", files={"r.yaml": "name: Bad Name\nsystem_prompt: x\n"}),
    # command-line overrides
    Case("lr-inf", ["build", "support-bot", "--lr", "inf", "--quiet"], "--lr"),
    Case("lr-negative", ["build", "support-bot", "--lr", "-1", "--quiet"], "--lr"),
    Case("loraplus-with-prefix", ["build", "support-bot", "--method", "prefix", "--loraplus-lr-ratio", "2", "--quiet"],
         "--loraplus-lr-ratio applies to qlora, lora and dora"),
    Case("system-prompt-blank", ["build", "support-bot", "--system-prompt", "  ", "--quiet"], "--system-prompt is empty"),
    Case("method-unknown", ["build", "support-bot", "--method", "full"], "'full' is not one of", exit=2),
    Case("data-out-is-a-file", ["data", "support-bot", "--out", "{work}/taken"], "is a file", exit=2,
         files={"taken": "mine"}),
    # scaffolding
    Case("recipes-new-bad-name", ["recipes", "new", "Bad Name", "--dir", "{work}/pkgs"], "try `agentpeft recipes new bad-name`"),
    Case("recipes-new-device-name", ["recipes", "new", "con", "--dir", "{work}/pkgs"], "Windows device name"),
    Case("recipes-new-too-long", ["recipes", "new", "a" * 300, "--dir", "{work}/pkgs"], "at most 64 characters"),
    Case("recipes-new-trailing-dot", ["recipes", "new", "acme.", "--dir", "{work}/pkgs"], "try `agentpeft recipes new acme`"),
    Case("recipes-new-taken", ["recipes", "new", "support-bot", "--dir", "{work}/pkgs"], "already registered"),
    # base models and the environment
    Case("models-pull-unknown", ["models", "pull", "no-such-alias"], "no-such-alias"),
    Case("plan-folder-without-config", ["plan", "--base", "{work}/empty"], "config.json", files={"empty/.keep": ""}),
    Case("home-below-a-file", ["build", "support-bot", "--quiet"], "Not a directory", files={"afile": "x"},
         env={"AGENTPEFT_HOME": "{work}/afile/home"}),
    # documented safe behaviour
    Case("list-skips-a-damaged-manifest", ["list"], "bot@1", exit=0, setup=_foreign_manifest),
]


def _tree(root: Path, skip: Path | None = None) -> dict[str, str]:
    """Every path under ``root`` (``skip`` and below left out) with its sha256, or the target of a link."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if skip is not None:
            dirnames[:] = [d for d in dirnames if Path(dirpath, d) != skip]
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = "-> " + os.readlink(path)
            elif path.is_file():
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                out[rel] = "dir"
    return out


def _publish_bot() -> None:
    src = Path(os.environ["AGENTPEFT_HOME"]).parent / "bot-src"
    src.mkdir()
    (src / "adapter_model.safetensors").write_bytes(b"weights")
    manifest = {"recipe": "support-bot", "base_model": {"name": "b", "sha256": "0" * 64}, "agentpeft_version": "0",
                "created": "now", "dataset": {"facts": 1, "splits": {"train": 1, "eval": 1}, "hash": "0" * 64},
                "train": {"config": {"method": "lora"}}, "merge": None,
                "metrics": {"primary": "accuracy", "base": {"accuracy": 0.0}, "tuned": {"accuracy": 1.0}}}
    registry.publish("bot", {"adapter": src}, manifest)


def test_the_corpus_holds_at_least_forty_distinct_cases():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, home: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _publish_bot()
    if case.setup is not None:
        case.setup(home)
    work, outside, temp = tmp_path / "work", tmp_path / "outside", tmp_path / "temp"
    for folder in (work, outside, temp):
        folder.mkdir()
    (outside / "passwd.md").write_text("## Root password?\n\nhunter2\n")
    for rel, content in case.files.items():
        path = work / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    for rel, target in case.links.items():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).symlink_to(target.replace("{outside}", str(outside)))
    if case.id == "kb-fifo-strict":
        os.mkfifo(work / "kb" / "pipe.md")
    for name, value in case.env.items():
        monkeypatch.setenv(name, value.replace("{work}", str(work)))
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    before = _tree(tmp_path, skip=home)
    registry_before = _tree(home / "registry")

    fill = {"{home}": str(home), "{work}": str(work)}
    args = [a.replace("{home}", fill["{home}"]).replace("{work}", fill["{work}"]) for a in case.args]
    result = CliRunner().invoke(cli, args, input="")

    output = result.output
    assert "Traceback" not in output, output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == case.exit, output
    lines = output.strip().splitlines()
    if case.exit == 0:
        assert case.expect in output, output
        assert not any(line.startswith("Error") for line in lines), output
    else:
        errors = [line for line in lines if line.startswith("Error")]
        assert len(errors) == 1 and errors[0] == lines[-1] and errors[0].startswith("Error: "), output
        assert case.expect in errors[0], errors[0]
    assert _tree(home / "registry") == registry_before, "the registry changed"
    assert _tree(tmp_path, skip=home) == before, "a file was written outside AGENTPEFT_HOME"
