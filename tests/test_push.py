"""The model card's hub metadata and `agentpeft push`, with the hub's network calls replaced."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from click.testing import CliRunner
from huggingface_hub import HfApi, ModelCard

from agentpeft import registry
from agentpeft.cli import cli
from conftest import one_line_error as _one_line_error


def _publish(tmp_path: Path, name: str = "bot") -> Path:
    src = tmp_path / "adapter"
    src.mkdir(exist_ok=True)
    (src / "w.bin").write_text("x")
    manifest = {"recipe": "support-bot", "description": "Answers Acme support questions.",
                "base_model": {"name": "HuggingFaceTB/SmolLM2-135M-Instruct", "sha256": "0" * 64,
                               "license": "apache-2.0"},
                "agentpeft_version": "0", "created": "now",
                "dataset": {"facts": 1, "splits": {"train": 1, "eval": 1}, "hash": "0" * 64},
                "train": {"config": {"method": "lora", "r": 8}}, "merge": {"max_logit_diff": 0.0},
                "metrics": {"primary": "key_fact", "base": {"key_fact": 0.25, "rougeL": 0.1},
                            "tuned": {"key_fact": 0.9, "rougeL": 0.6}}}
    return registry.publish(name, {"adapter": src}, manifest)[1]


def test_the_model_card_carries_hub_metadata_and_its_text(home, tmp_path):
    entry = _publish(tmp_path)
    card = ModelCard.load(entry / "README.md")
    data = card.data
    assert data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and data.license == "apache-2.0"
    assert data.library_name == "peft" and data.datasets == ["support-bot-kb"]
    assert data.tags == ["agentpeft", "lora", "support-bot"]
    results = {r.metric_type: r.metric_value for r in data.eval_results}
    assert results == {"key_fact": 0.9, "rougeL": 0.6}
    assert {r.task_type for r in data.eval_results} == {"text-generation"}
    # The text is what it was: title, description, the base-vs-tuned table, training and files.
    for text in ("# bot (version 1)", "Answers Acme support questions.", "| key_fact | 0.250 | 0.900 |",
                 "Primary metric: key_fact.", "- r: 8", "`merged/`", 'load_llm("bot")'):
        assert text in card.text, text


@pytest.fixture
def hub(monkeypatch):
    """HfApi's create_repo and upload_folder replaced: each call's arguments, checked against the real
    signatures, are recorded with the files the upload would send."""
    calls: list[tuple[str, dict]] = []

    def fake(name: str, result):
        real = getattr(HfApi, name)

        def call(self, *args, **kwargs):
            inspect.signature(real).bind(self, *args, **kwargs)  # only documented arguments
            if name == "upload_folder":
                folder = Path(kwargs["folder_path"])
                kwargs["files"] = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
            calls.append((name, kwargs))
            return result

        monkeypatch.setattr(HfApi, name, call)

    commit = type("CommitInfo", (), {"commit_url": "https://huggingface.co/acme/bot/commit/abc123"})()
    fake("create_repo", "https://huggingface.co/acme/bot")
    fake("upload_folder", commit)
    return calls


def test_push_uploads_an_hf_export(home, tmp_path, hub, monkeypatch):
    _publish(tmp_path)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    result = CliRunner().invoke(cli, ["push", "bot@1", "acme/bot", "--private"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "pushed bot@1 to acme/bot: https://huggingface.co/acme/bot/commit/abc123"
    (create, created), (upload, uploaded) = hub
    assert create == "create_repo" and created == {"repo_id": "acme/bot", "repo_type": "model", "private": True,
                                                    "exist_ok": True}
    assert upload == "upload_folder" and uploaded["repo_id"] == "acme/bot" and uploaded["repo_type"] == "model"
    assert uploaded["commit_message"] == "agentpeft: bot@1"
    assert uploaded["files"] == ["README.md", "adapter/w.bin", "manifest.json"]
    assert not Path(uploaded["folder_path"]).exists()  # the temporary export is gone


def test_push_without_a_token_is_one_line(home, tmp_path, hub, monkeypatch):
    _publish(tmp_path)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no saved token there
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    _one_line_error(CliRunner().invoke(cli, ["push", "bot", "acme/bot"]), "no Hugging Face token", "HF_TOKEN")
    assert hub == []


@pytest.mark.parametrize(("args", "fragment"), [
    (["push", "bot", "not a repo"], "invalid repository id"),
    (["push", "bot", "bot"], "OWNER/NAME"),
    (["push", "ghost", "acme/bot"], "ghost"),
])
def test_push_refuses_bad_arguments_in_one_line(home, tmp_path, hub, monkeypatch, args, fragment):
    _publish(tmp_path)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    _one_line_error(CliRunner().invoke(cli, args), fragment)
    assert hub == []


def test_a_refused_upload_is_one_line(home, tmp_path, monkeypatch):
    import httpx
    from huggingface_hub.errors import HfHubHTTPError

    _publish(tmp_path)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    response = httpx.Response(403, request=httpx.Request("POST", "https://huggingface.co/api/repos/create"))

    def refuse(self, *args, **kwargs):
        raise HfHubHTTPError("403 Forbidden: you cannot create repositories under acme", response=response)

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    _one_line_error(CliRunner().invoke(cli, ["push", "bot", "acme/bot"]), "pushing to acme/bot failed",
                    "403 Forbidden")
