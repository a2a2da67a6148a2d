"""The whole pipeline on a tiny random-init model: every stage runs and the result is usable."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from agentpeft.cli import cli
from agentpeft.pipeline.build import build
from agentpeft.registry import registry_dir


@pytest.fixture(scope="module")
def built(tiny_base, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    mp = pytest.MonkeyPatch()
    mp.setenv("AGENTPEFT_HOME", str(home))
    result = build("support-bot", base=str(tiny_base), max_steps=3, allow_regression=True,
                   show_progress=False, log=lambda s: None)
    yield result
    mp.undo()


def test_build_registers_every_artifact(built):
    assert built.version == 1
    for name in ("manifest.json", "README.md", "merged/model.safetensors", "merged/tokenizer.json",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "eval.json", "report.md",
                 "dataset_card.md"):
        assert (built.path / name).is_file(), name
    manifest = json.loads((built.path / "manifest.json").read_text())
    assert manifest["train"]["steps"] == 3
    assert manifest["train"]["config"]["method"] == "qlora"
    # What actually ran, which the config's dequantize_once=None leaves to the machine.
    assert manifest["train"]["precision"].endswith("compute, fp32 adapter")
    assert manifest["train"]["device"]
    assert f"trained with {manifest['train']['precision']} on" in (built.path / "README.md").read_text()
    assert set(manifest["metrics"]["base"]) == {"accuracy", "rouge_l"}
    assert manifest["merge"]["max_logit_diff"] <= 1e-3
    assert len(manifest["base_model"]["sha256"]) == 64
    config = json.loads((built.path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    assert set(built.seconds) == {"ingest", "dataset", "train", "evaluate", "merge", "register"}


def test_adapter_was_trained_against_4bit_weights(built):
    from peft import PeftConfig

    config = PeftConfig.from_pretrained(str(built.path / "adapter"))
    assert config.r == 16 and config.peft_type == "LORA"
    log = [json.loads(line) for line in (built.build_dir / "train_log.jsonl").read_text().splitlines()]
    assert any("loss" in row for row in log) and all(row.get("grad_norm", 0) == row.get("grad_norm", 0) for row in log)


def test_load_llm_invoke_and_stream(built, monkeypatch):
    monkeypatch.setenv("AGENTPEFT_HOME", str(built.path.parents[2]))
    from agentpeft.langchain import load_llm

    llm = load_llm("support-bot", max_new_tokens=5)
    reply = llm.invoke("How long is the warranty?")
    assert isinstance(reply.content, str) and reply.content
    chunks = list(llm.stream("How long is the warranty?"))
    assert len(chunks) >= 1 and "".join(c.content for c in chunks).strip() == reply.content.strip()
    assert load_llm("support-bot", version=1).llm.pipeline.model is llm.llm.pipeline.model  # loaded once


def test_cli_show_and_list(built, monkeypatch):
    monkeypatch.setenv("AGENTPEFT_HOME", str(built.path.parents[2]))
    runner = CliRunner()
    shown = runner.invoke(cli, ["show", "support-bot", "--json"])
    assert shown.exit_code == 0, shown.output
    manifest = json.loads(shown.output)
    assert manifest["name"] == "support-bot" and "tuned" in manifest["metrics"]
    listed = runner.invoke(cli, ["list"])
    assert "support-bot@1" in listed.output


def test_gate_refuses_registration_without_improvement(tiny_base, home):
    result = build("support-bot", base=str(tiny_base), max_steps=1, show_progress=False, log=lambda s: None,
                   name="gated")
    # A random 2-layer model answers no key fact before or after one step: no improvement.
    assert result.eval.tuned["accuracy"] == result.eval.base["accuracy"] == 0.0
    assert result.version is None
    assert not (registry_dir() / "gated").exists() or not any((registry_dir() / "gated").glob("[0-9]*"))


def test_interrupted_build_resumes_from_its_checkpoint(tiny_base, home, monkeypatch):
    import agentpeft.pipeline.build as build_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(build_module, "evaluate", interrupted)
        with pytest.raises(KeyboardInterrupt):
            build("support-bot", base=str(tiny_base), max_steps=2, save_steps=1, method="lora",
                  show_progress=False, log=lambda s: None)
    assert not (registry_dir() / "support-bot").exists() or not any((registry_dir() / "support-bot").glob("[0-9]*"))
    logs = []
    result = build("support-bot", base=str(tiny_base), max_steps=3, save_steps=1, method="lora", resume=True,
                   allow_regression=True, show_progress=False, log=logs.append)
    assert any(line.startswith("resuming from") and line.endswith("checkpoint-2") for line in logs), logs
    assert result.version == 1 and (result.build_dir / "FINISHED").is_file()
    assert len(list(result.build_dir.parent.iterdir())) == 1  # the same build folder was continued


def test_eval_command_on_registered_and_base_models(built, tiny_base, tmp_path, monkeypatch):
    monkeypatch.setenv("AGENTPEFT_HOME", str(built.path.parents[2]))
    runner = CliRunner()
    own = runner.invoke(cli, ["eval", "support-bot", "--json", "--max-new-tokens", "4"])
    assert own.exit_code == 0, own.output
    figures = json.loads(own.output[own.output.index("{"):])
    held_out = json.loads((built.path / "manifest.json").read_text())["dataset"]["splits"]["eval"]
    assert figures["model"] == "support-bot@1" and figures["n"] == held_out
    assert set(figures["metrics"]) == {"accuracy", "rouge_l"}
    from agentpeft.models import inference_precision

    assert figures["precision"] == inference_precision()
    plain = runner.invoke(cli, ["eval", "support-bot", "--max-new-tokens", "2", "--metrics", "accuracy"])
    assert plain.exit_code == 0
    assert f"questions (held-out questions of the build; {inference_precision()}):" in plain.output
    data = tmp_path / "qa.jsonl"
    data.write_text('{"question": "What is 2 + 2?", "answer": "4", "key": "4"}\n')
    base = runner.invoke(cli, ["eval", str(tiny_base), "--data", str(data), "--metrics", "accuracy,token_f1,perplexity",
                               "--json", "--max-new-tokens", "3"])
    assert base.exit_code == 0, base.output
    result = json.loads(base.output[base.output.index("{"):])
    assert result["n"] == 1 and set(result["metrics"]) == {"accuracy", "token_f1", "perplexity"}
    assert result["metrics"]["perplexity"] > 1
    data.write_text("not json\n")
    bad = runner.invoke(cli, ["eval", "support-bot", "--data", str(data)])
    assert bad.exit_code == 1 and "qa.jsonl:1: not valid JSON" in bad.output
    missing = runner.invoke(cli, ["eval", "nobody-here"])
    assert missing.exit_code == 1 and "neither a registered model" in missing.output
    no_provider = runner.invoke(cli, ["eval", "support-bot", "--judge", "nosuchprovider:model", "--max-new-tokens", "2"])
    assert no_provider.exit_code == 1 and "chat model 'nosuchprovider:model' could not be created" in no_provider.output


def test_judge_is_reported_beside_the_metrics(built, tiny_base, monkeypatch, tmp_path):
    import agentpeft.chat_models
    from agentpeft.pipeline.evaluate import chat_rows, evaluate
    from test_metrics import _ScriptedJudge

    monkeypatch.setattr(agentpeft.chat_models, "chat_model", lambda spec: _ScriptedJudge())
    rows = chat_rows([{"question": "How long is the warranty?", "answer": "Two years.", "key": "Two years"}], "Be brief.")
    result = evaluate(tiny_base, built.path / "adapter", rows, ["accuracy"], "accuracy", tmp_path, max_new_tokens=3,
                      probe=False, judge="scripted")
    assert set(result.judge) == {"model", "base", "tuned"} and result.judge["model"] == "scripted"
    assert "| judge (scripted), share correct |" in result.table()
    assert json.loads((tmp_path / "eval.json").read_text())["judge"] == result.judge
    monkeypatch.setenv("AGENTPEFT_HOME", str(built.path.parents[2]))
    out = CliRunner().invoke(cli, ["eval", "support-bot", "--json", "--max-new-tokens", "4", "--judge", "scripted"])
    assert out.exit_code == 0, out.output
    figures = json.loads(out.output[out.output.index("{"):])["metrics"]
    assert set(figures) == {"accuracy", "rouge_l", "judge (scripted)"} and 0 <= figures["judge (scripted)"] <= 1


def test_build_reports_forgetting_and_charts(built):
    manifest = json.loads((built.path / "manifest.json").read_text())
    forgetting = manifest["metrics"]["forgetting"]
    assert forgetting["n"] >= 100 and 0 <= forgetting["base_accuracy"] <= 1
    assert forgetting["accuracy_drop"] == pytest.approx(forgetting["base_accuracy"] - forgetting["tuned_accuracy"])
    assert forgetting["base_perplexity"] > 1 and forgetting["tuned_perplexity"] > 1
    for png in ("metrics.png", "loss_curve.png"):
        assert (built.path / png).read_bytes()[:4] == b"\x89PNG"
    assert "forgetting-probe accuracy" in (built.path / "report.md").read_text()


def test_html_report_has_tables_and_embedded_charts(built, monkeypatch, tmp_path):
    from html.parser import HTMLParser

    monkeypatch.setenv("AGENTPEFT_HOME", str(built.path.parents[2]))
    out = tmp_path / "report.html"
    result = CliRunner().invoke(cli, ["report", "support-bot", "--out", str(out), "--no-open"])
    assert result.exit_code == 0, result.output

    class Collect(HTMLParser):
        tables, images, rows = [], [], 0

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "table":
                self.tables.append(attrs.get("class"))
            if tag == "img":
                self.images.append(attrs["src"][:22])
            if tag == "tr":
                self.rows += 1

    parser = Collect()
    parser.feed(out.read_text())
    assert parser.tables == ["comparison", "dataset", "training", "answers"]
    assert parser.images == ["data:image/png;base64,"] * 2
    held_out = json.loads((built.path / "manifest.json").read_text())["dataset"]["splits"]["eval"]
    assert parser.rows > held_out  # every held-out question has its row


@pytest.mark.skipif(not __import__("shutil").which("chromium"), reason="Chromium is not installed on this machine")
def test_html_report_renders_in_headless_chromium(built, monkeypatch, tmp_path):
    import subprocess

    monkeypatch.setenv("AGENTPEFT_HOME", str(built.path.parents[2]))
    from agentpeft.report import write_report

    page = write_report("support-bot", tmp_path / "report.html")
    dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          "--disable-component-update", "--disable-sync", "--no-first-run",
                          f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    assert dom.count("<table") == 4 and dom.count("data:image/png;base64,") == 2


def test_gate_refuses_a_zero_step_adapter_and_train_command_stops_before_eval(tiny_base, home):
    logs = []
    result = build("support-bot", base=str(tiny_base), max_steps=0, method="lora", show_progress=False,
                   log=logs.append, name="useless")
    assert result.train.steps == 0 and result.train.final_loss is None
    # An untrained LoRA adapter (B = 0) changes nothing, so the tuned model cannot beat the base.
    assert result.eval.tuned == result.eval.base
    assert result.version is None and any("register: refused" in line for line in logs)
    assert not (registry_dir() / "useless").exists() or not any((registry_dir() / "useless").glob("[0-9]*"))

    import datasets
    from transformers.utils import logging as transformers_logging

    datasets.enable_progress_bars()  # as a fresh process has them: --quiet must switch them off
    transformers_logging.enable_progress_bar()
    out = CliRunner().invoke(cli, ["train", "support-bot", "--base", str(tiny_base), "--max-steps", "1",
                                   "--method", "lora", "--name", "trained-only", "--quiet"])
    assert out.exit_code == 0, out.output
    assert "trainable params:" in out.output and "[3/6] train:" in out.output and "evaluate" not in out.output
    assert "it/s]" not in out.output and "examples/s]" not in out.output, out.output  # no progress bars
    adapter = out.output.strip().splitlines()[-1].removeprefix("adapter: ")
    assert (Path(adapter) / "adapter_model.safetensors").is_file()
    assert not (registry_dir() / "trained-only").exists()


def test_eval_limit_evaluates_a_seeded_sample(tiny_base, home):
    from conftest import build_tiny

    result = build_tiny(tiny_base, "sampled", max_steps=1, eval_limit=5)
    assert json.loads((result.build_dir / "eval" / "eval.json").read_text())["n"] == 5
    runner = CliRunner()
    bad = runner.invoke(cli, ["build", "support-bot", "--eval-limit", "0"])
    assert bad.exit_code == 2 and "--eval-limit" in bad.output


def test_a_rebuild_reuses_the_base_models_answers(tiny_base, home, monkeypatch):
    from conftest import build_tiny

    import agentpeft.pipeline.evaluate as evaluate

    asked = []
    real = evaluate.score_model
    monkeypatch.setattr(evaluate, "score_model", lambda model, tok, rows, *a, **k: asked.append(len(rows)) or
                        real(model, tok, rows, *a, **k))
    first = build_tiny(tiny_base, "first", max_steps=1, eval_limit=6)
    assert len(asked) == 2  # base, then tuned (the cheap test evaluation skips the probe)
    asked.clear()
    second = build_tiny(tiny_base, "second", max_steps=2, eval_limit=6)
    assert asked == [6]  # only the tuned model answered
    evals = [json.loads((r.build_dir / "eval" / "eval.json").read_text()) for r in (first, second)]
    assert evals[0]["base"] == evals[1]["base"]
    assert [e["base"] for e in evals[0]["examples"]] == [e["base"] for e in evals[1]["examples"]]
    assert len(list((home / "cache" / "base-eval").glob("*.json"))) == 1
    # Other questions are other answers: a third build on a different sample asks the base again.
    asked.clear()
    build_tiny(tiny_base, "third", max_steps=1, eval_limit=5)
    assert asked == [5, 5]
    # Answers computed in another precision are other answers too.
    from agentpeft import models

    assert evals[0]["precision"] == models.inference_precision()
    monkeypatch.setattr(models, "cpu_bf16_supported", lambda: True)
    key = lambda: evaluate._base_cache_file(tiny_base, [], [], ["accuracy"], 8)  # noqa: E731
    bf16 = key()
    monkeypatch.setenv(models.INFERENCE_DTYPE_ENV, "float32")
    assert key() != bf16


def test_an_unwritable_base_answer_cache_costs_only_a_rebuild(tiny_base, home):
    """Like the dataset cache: a base-eval cache that cannot be written does not fail the build."""
    from conftest import build_tiny

    (home / "cache").mkdir(parents=True, exist_ok=True)
    (home / "cache" / "base-eval").write_text("a file where the cache folder belongs")
    result = build_tiny(tiny_base, "nocache", max_steps=1, eval_limit=4)
    assert json.loads((result.build_dir / "eval" / "eval.json").read_text())["n"] == 4
    assert (home / "cache" / "base-eval").is_file()
