"""The OpenAI-compatible endpoint, exercised with the `openai` client against a server on localhost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

ROOT = Path(__file__).resolve().parents[1]
QUESTION = [{"role": "user", "content": "How long is the standard warranty?"}]


@pytest.fixture(scope="module")
def server(registered):
    mp = pytest.MonkeyPatch()
    mp.setenv("AGENTPEFT_HOME", str(registered["home"]))
    from agentpeft.serve import make_server

    httpd = make_server("support-bot", port=0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    host, port = httpd.server_address[:2]
    yield f"http://{host}:{port}/v1"
    httpd.shutdown()
    httpd.server_close()
    mp.undo()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server, api_key="unused", max_retries=0)


def _post(url: str, body: bytes) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_binds_to_localhost_by_default(server):
    assert server.startswith("http://127.0.0.1:")


def test_models(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["support-bot", "support-bot@1"]
    assert client.models.retrieve("support-bot@1").owned_by == "agentpeft"


def test_completion_matches_the_langchain_model(client, registered, monkeypatch):
    monkeypatch.setenv("AGENTPEFT_HOME", str(registered["home"]))
    from agentpeft.langchain import load_llm

    reply = client.chat.completions.create(model="support-bot", messages=QUESTION, max_tokens=6)
    expected = load_llm("support-bot").invoke(QUESTION[0]["content"], max_new_tokens=6)
    assert reply.object == "chat.completion" and reply.model == "support-bot@1"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected.content
    assert reply.usage.prompt_tokens == expected.usage_metadata["input_tokens"]
    assert 1 <= reply.usage.completion_tokens <= 6
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_streaming_sends_chunks_that_add_up_to_the_reply(client):
    whole = client.chat.completions.create(model="support-bot", messages=QUESTION, max_tokens=6)
    chunks = list(client.chat.completions.create(model="support-bot", messages=QUESTION, max_tokens=6, stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 2 and "".join(pieces) == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_raw_stream_ends_with_done(server):
    body = json.dumps({"model": "support-bot", "messages": QUESTION, "max_tokens": 3, "stream": True}).encode()
    status, raw = _post(f"{server}/chat/completions", body)
    assert status == 200
    events = raw.decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert json.loads(events[0][6:])["choices"][0]["delta"]["role"] == "assistant"


def test_conversation_with_system_and_assistant_turns(client):
    messages = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": [{"type": "text", "text": "Bye"}]}]
    reply = client.chat.completions.create(model="support-bot@1", messages=messages, max_tokens=3, temperature=0,
                                           stop=["\n\n\n"])
    assert isinstance(reply.choices[0].message.content, str)


def test_bad_requests_get_openai_style_errors(client, server):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="support-bot", messages=[])
    assert err.value.status_code == 400 and err.value.body["type"] == "invalid_request_error"
    assert err.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError, match="n: Input should be less than or equal to 1"):
        client.chat.completions.create(model="support-bot", messages=QUESTION, n=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="support-bot", messages=QUESTION, temperature=5)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="support-bot", messages=[{"role": "user", "content": "hi " * 600}])
    assert err.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    assert err.value.body["code"] == "model_not_found"
    status, raw = _post(f"{server}/chat/completions", b"{not json")
    assert status == 400 and json.loads(raw)["error"]["message"] == "the request body is not valid JSON"
    status, raw = _post(f"{server}/completions", b"{}")
    assert status == 404 and "no route" in json.loads(raw)["error"]["message"]


def test_concurrent_requests_are_served(client):
    def ask(_):
        return client.chat.completions.create(model="support-bot", messages=QUESTION, max_tokens=4)

    with ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(ask, range(3)))
    assert len({r.choices[0].message.content for r in replies}) == 1  # greedy: the same reply each time


def test_serve_command(registered):
    env = {**os.environ, "AGENTPEFT_HOME": str(registered["home"]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "agentpeft", "serve", "support-bot", "--port", "0"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = ""
        for line in proc.stdout:
            if line.startswith("serving "):
                break
        assert line.startswith("serving support-bot@1 at http://127.0.0.1:"), line
        url = line.split(" at ")[1].split()[0]
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        assert client.chat.completions.create(model="support-bot", messages=QUESTION, max_tokens=2).choices
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    bad = subprocess.run([sys.executable, "-m", "agentpeft", "serve", "no-such-model"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "Error: no model named 'no-such-model'" in bad.stderr
    assert "Traceback" not in bad.stderr
