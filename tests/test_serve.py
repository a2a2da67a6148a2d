"""The OpenAI-compatible endpoint, exercised with the `openai` client and raw HTTP against servers on localhost."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

ROOT = Path(__file__).resolve().parents[1]
QUESTION = [{"role": "user", "content": "How long is the standard warranty?"}]
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def start(registered):
    """Starts a server on a free port for support-bot@1 with the given make_server options."""
    mp = pytest.MonkeyPatch()
    mp.setenv("AGENTPEFT_HOME", str(registered["home"]))
    from agentpeft.serve import make_server

    servers = []

    def start(**options):
        httpd = make_server("support-bot", port=0, **options).start()
        servers.append(httpd)
        return httpd

    yield start
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()
    mp.undo()


@pytest.fixture(scope="module")
def httpd(start):
    return start()


@pytest.fixture(scope="module")
def server(httpd):
    return httpd.url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server, api_key="unused", max_retries=0)


def _origin(httpd) -> str:
    return httpd.url.removesuffix("/v1")


def _body(**fields) -> bytes:
    return json.dumps({"model": "support-bot", "messages": QUESTION, **fields}).encode()


def _post(httpd, body: bytes, headers: dict | None = None, path: str = CHAT) -> httpx.Response:
    return httpx.post(_origin(httpd) + path, content=body, timeout=120,
                      headers={"Content-Type": "application/json", **(headers or {})})


def _raw(httpd, data: bytes, wait: float = 10.0, then: bytes = b"") -> bytes:
    """Sends raw bytes (then ``then`` after a pause, if any), returns what comes back before the server
    closes the connection or ``wait`` seconds pass."""
    with socket.create_connection(httpd.server_address, timeout=wait) as sock:
        sock.sendall(data)
        if then:
            time.sleep(0.3)
            sock.sendall(then)
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return out


def _head(httpd, method: str = "POST", path: str = CHAT, **headers) -> bytes:
    host, port = httpd.server_address
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}",
             *(f"{k.replace('_', '-')}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# --- the OpenAI API, through the openai SDK -------------------------------------------------------------
def test_binds_to_localhost_by_default(server):
    assert server.startswith("http://127.0.0.1:")


def test_models_and_health(client, httpd):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["support-bot", "support-bot@1"]
    assert client.models.retrieve("support-bot@1").owned_by == "agentpeft"
    reply = httpx.get(_origin(httpd) + "/health")
    assert reply.status_code == 200 and reply.json() == {"status": "ok", "model": "support-bot@1"}


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


def test_raw_stream_ends_with_done(httpd):
    reply = _post(httpd, _body(max_tokens=3, stream=True))
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
    events = reply.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert json.loads(events[0][6:])["choices"][0]["delta"]["role"] == "assistant"


def test_conversation_with_system_and_assistant_turns(client):
    messages = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": [{"type": "text", "text": "Bye"}]}]
    reply = client.chat.completions.create(model="support-bot@1", messages=messages, max_tokens=3, temperature=0,
                                           stop=["\n\n\n"])
    assert isinstance(reply.choices[0].message.content, str)


def test_bad_requests_get_openai_style_errors(client, httpd):
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
    reply = _post(httpd, b"{not json")
    assert reply.status_code == 400 and reply.json()["error"]["message"] == "the request body is not valid JSON"
    reply = _post(httpd, b"{}", path="/v1/completions")
    assert reply.status_code == 404 and "no route" in reply.json()["error"]["message"]


def test_concurrent_requests_are_served(client):
    def ask(_):
        return client.chat.completions.create(model="support-bot", messages=QUESTION, max_tokens=4)

    with ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(ask, range(3)))
    assert len({r.choices[0].message.content for r in replies}) == 1  # greedy: the same reply each time


def test_api_key(start):
    keyed = start(api_key="s3cret-key")
    with pytest.raises(openai.AuthenticationError) as err:
        openai.OpenAI(base_url=keyed.url, api_key="wrong", max_retries=0).models.list()
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    assert httpx.post(keyed.url + "/chat/completions", content=_body(max_tokens=2),
                      headers={"Content-Type": "application/json"}).status_code == 401  # no key at all
    good = openai.OpenAI(base_url=keyed.url, api_key="s3cret-key", max_retries=0)
    assert good.chat.completions.create(model="support-bot", messages=QUESTION, max_tokens=2).choices
    assert httpx.get(_origin(keyed) + "/health").status_code == 200  # health checks need no key


# --- hardening, over raw HTTP --------------------------------------------------------------------------
def test_only_json_bodies_are_accepted(httpd):
    reply = _post(httpd, _body(max_tokens=2), headers={"Content-Type": "text/plain"})
    assert reply.status_code == 415 and reply.json()["error"]["type"] == "invalid_request_error"
    reply = _post(httpd, _body(max_tokens=2), headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert reply.status_code == 415
    assert _post(httpd, _body(max_tokens=2), headers={"Content-Type": "application/json; charset=utf-8"}).is_success


def test_bad_content_lengths_are_refused_at_once(httpd):
    started = time.monotonic()
    for length, status in (("-1", b"400"), ("abc", b"400"), ("1e3", b"400"), (str(10 ** 12), b"413"),
                           (str((1 << 20) + 1), b"413")):
        head = _head(httpd, Content_Type="application/json", Content_Length=length)
        assert _raw(httpd, head, wait=10).split(b"\r\n")[0].split(b" ")[1] == status, length
    assert time.monotonic() - started < 5  # answered, not waiting for a body that will never come


def test_bodies_over_1_mib_are_refused_when_chunked(httpd):
    chunk = b"x" * 65536
    data = _head(httpd, Content_Type="application/json", Transfer_Encoding="chunked")
    data += b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(17))  # 1.06 MiB, no final chunk
    assert _raw(httpd, data).startswith(b"HTTP/1.1 413 ")


def test_slow_clients_are_cut_off(start):
    slow = start(header_timeout=1, body_timeout=1)
    started = time.monotonic()
    partial = _head(slow).split(b"\r\n\r\n")[0] + b"\r\nX-Slow: "  # headers never finished
    assert _raw(slow, partial, wait=10) == b"" and time.monotonic() - started < 5
    started = time.monotonic()
    with socket.create_connection(slow.server_address, timeout=10) as sock:  # a header byte every 0.3 s
        sock.sendall(partial)
        closed = False
        while not closed and time.monotonic() - started < 8:
            try:
                closed = _readable(sock) and sock.recv(100) == b""
                sock.sendall(b"a")
            except OSError:
                closed = True
            time.sleep(0.3)
        assert closed
    assert time.monotonic() - started < 6
    body = _body(max_tokens=2)
    head = _head(slow, Content_Type="application/json", Content_Length=str(len(body)))
    reply = _raw(slow, head + body[:10], wait=10)  # the rest of the body never comes
    assert reply.startswith(b"HTTP/1.1 408 ")


def _readable(sock) -> bool:
    import select

    return bool(select.select([sock], [], [], 0)[0])


def test_connections_are_bounded(start):
    bounded = start(limit_concurrency=2)
    idle = [socket.create_connection(bounded.server_address) for _ in range(2)]
    try:
        time.sleep(0.3)
        assert httpx.get(_origin(bounded) + "/health").status_code == 503
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.3)
    assert httpx.get(_origin(bounded) + "/health").status_code == 200


def test_only_loopback_host_headers_are_answered(httpd):
    port = httpd.server_address[1]
    url = _origin(httpd) + "/v1/models"
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "localhost", f"LOCALHOST:{port}"):
        assert httpx.get(url, headers={"Host": host}).status_code == 200, host
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1:{port + 1}", f"localhost.evil.example:{port}"):
        reply = httpx.get(url, headers={"Host": host})
        assert reply.status_code == 400 and reply.json()["error"]["code"] == "invalid_host", host


def test_cross_origin_browser_requests_are_refused(httpd):
    reply = _post(httpd, _body(max_tokens=2), headers={"Origin": "https://evil.example"})
    assert reply.status_code == 403 and "access-control-allow-origin" not in reply.headers
    assert _post(httpd, _body(max_tokens=2), headers={"Origin": "null"}).status_code == 403
    preflight = httpx.options(_origin(httpd) + CHAT, headers={"Origin": "https://evil.example",
                                                              "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 403 and "access-control-allow-origin" not in preflight.headers
    reply = _post(httpd, _body(max_tokens=2), headers={"Origin": f"http://localhost:{httpd.server_address[1]}"})
    assert reply.status_code == 200 and "access-control-allow-origin" not in reply.headers


def test_server_errors_do_not_reveal_internals(httpd, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("secret detail at /home/someone/model")

    def fail_streaming(*args, **kwargs):
        yield {"choices": []}
        fail()

    monkeypatch.setattr(httpd.model, "complete", fail)
    monkeypatch.setattr(httpd.model, "stream", fail_streaming)
    reply = _post(httpd, _body(max_tokens=2))
    assert reply.status_code == 500 and reply.json()["error"]["type"] == "server_error"
    assert "secret" not in reply.text and "RuntimeError" not in reply.text
    reply = _post(httpd, _body(max_tokens=2, stream=True))
    assert "server_error" in reply.text and reply.text.endswith("data: [DONE]\n\n")
    assert "secret" not in reply.text and "RuntimeError" not in reply.text


@pytest.mark.parametrize("depth", [100, 100_000])
def test_deeply_nested_json_is_a_client_error(httpd, depth):
    body = b'{"model": "support-bot", "messages": ' + b"[" * depth + b"]" * depth + b"}"
    reply = _post(httpd, body)
    assert reply.status_code == 400 and "nested" in reply.json()["error"]["message"]


def test_seed_leaves_the_process_rng_alone(client):
    import torch

    before = torch.get_rng_state()
    asks = [client.chat.completions.create(model="support-bot", messages=QUESTION, max_tokens=5, temperature=1.0,
                                           seed=7) for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), before)
    assert asks[0].choices[0].message.content == asks[1].choices[0].message.content  # the seed still seeds


def test_a_full_queue_answers_503_with_retry_after(start, monkeypatch):
    queued = start(max_queue=1)
    release = threading.Event()
    real = queued.model.complete

    def slow(messages, kwargs):
        release.wait(30)
        return real(messages, kwargs)

    monkeypatch.setattr(queued.model, "complete", slow)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(_post, queued, _body(max_tokens=2))
        _until(lambda: queued.queue.lock.locked())
        second = pool.submit(_post, queued, _body(max_tokens=2))
        _until(lambda: queued.queue.waiting == 1)
        third = _post(queued, _body(max_tokens=2))
        assert third.status_code == 503 and third.headers["retry-after"].isdigit()
        assert third.json()["error"]["code"] == "server_busy"
        release.set()
        assert first.result().status_code == 200 and second.result().status_code == 200
    assert not queued.queue.lock.locked() and queued.queue.waiting == 0


def _until(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture
def generation_steps(monkeypatch):
    """Slows generation to 20 ms a token and records, per step, whether the cancellation stopped it."""
    from agentpeft import chat_models

    steps: list[bool] = []
    real = chat_models._StopOnEvent.__call__

    def step(self, input_ids, scores, **kwargs):
        time.sleep(0.02)
        done = real(self, input_ids, scores, **kwargs)
        steps.append(bool(done.all()))
        return done

    monkeypatch.setattr(chat_models._StopOnEvent, "__call__", step)
    return steps


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_disconnects_stops_its_generation(httpd, generation_steps, stream):
    body = _body(max_tokens=400, stream=stream)
    head = _head(httpd, Content_Type="application/json", Content_Length=str(len(body)))
    with socket.create_connection(httpd.server_address) as sock:
        sock.sendall(head + body)
        _until(lambda: len(generation_steps) >= 3)
    _until(lambda: not httpd.queue.lock.locked(), timeout=10)
    assert generation_steps[-1] is True  # the last step saw the cancellation, and no step came after it
    assert len(generation_steps) < 100
    count = len(generation_steps)
    time.sleep(0.3)
    assert len(generation_steps) == count


# --- the command ---------------------------------------------------------------------------------------
def test_serve_command(registered):
    env = {**os.environ, "AGENTPEFT_HOME": str(registered["home"]), "OMP_NUM_THREADS": "1",
           "AGENTPEFT_API_KEY": "from-env"}
    proc = subprocess.Popen([sys.executable, "-m", "agentpeft", "serve", "support-bot", "--port", "0",
                             "--max-queue", "2"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        line = ""
        for line in proc.stdout:
            if line.startswith("serving "):
                break
        assert line.startswith("serving support-bot@1 at http://127.0.0.1:"), line
        url = line.split(" at ")[1].split()[0]
        client = openai.OpenAI(base_url=url, api_key="from-env", max_retries=0)
        assert client.chat.completions.create(model="support-bot", messages=QUESTION, max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="other", max_retries=0).models.list()
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        busy = subprocess.run([sys.executable, "-m", "agentpeft", "serve", "support-bot", "--port", str(port)],
                              cwd=ROOT, env=env, capture_output=True, text=True)
        assert busy.returncode == 1 and f"Error: cannot listen on 127.0.0.1:{port}" in busy.stderr
        assert "Traceback" not in busy.stderr and len(busy.stderr.strip().splitlines()) == 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    bad = subprocess.run([sys.executable, "-m", "agentpeft", "serve", "no-such-model"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "Error: no model named 'no-such-model'" in bad.stderr
    assert "Traceback" not in bad.stderr
