"""An OpenAI-compatible HTTP endpoint for a registered model (FastAPI app served by uvicorn).

``POST /v1/chat/completions`` (JSON, or server-sent events with ``stream: true``), ``GET /v1/models``
and ``GET /health``. Generation runs one request at a time; up to ``max_queue`` more wait their turn
and further ones get 503 with ``Retry-After``. A client that disconnects stops its generation.

What bounds what (see docs/reliability.md, "Serving"):

- request line and headers: at most 16 KiB (h11's incomplete-event limit; over it, 400) and at most
  ``header_timeout`` seconds from the connection's start or the previous response (then the
  connection is closed); an idle keep-alive connection is closed after ``keep_alive`` seconds;
- body: ``application/json`` only (415), at most 1 MiB whether declared by Content-Length or sent
  chunked (413), received within ``body_timeout`` seconds (408); JSON nested over 64 levels: 400;
- connections: at most ``limit_concurrency`` open at once (uvicorn answers 503 beyond it);
- callers: ``Host`` must name this machine's loopback address (or the bound host), a browser's
  ``Origin`` must be a loopback one (403 otherwise, and no CORS headers are ever sent), and with an
  API key every route but ``/health`` needs ``Authorization: Bearer KEY`` (401).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Literal
from urllib.parse import urlsplit

from fastapi import Request
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage
from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_BODY = 1 << 20  #: bytes of a request body
MAX_JSON_DEPTH = 64  #: nesting levels of a request body's JSON
MAX_QUEUE = 8  #: requests waiting for the model beyond the one generating
LIMIT_CONCURRENCY = 64  #: open connections (uvicorn answers 503 beyond)
HEADER_TIMEOUT = 10.0  #: seconds to receive a request's line and headers
BODY_TIMEOUT = 30.0  #: seconds to receive a request's body
KEEP_ALIVE = 5  #: seconds an idle keep-alive connection stays open
RETRY_AFTER = 5  #: seconds a client turned away by a full queue is told to wait
LOOPBACK = ("localhost", "127.0.0.1", "::1")

logger = logging.getLogger("agentpeft.serve")


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None
    tool_calls: list[dict] | None = None
    tool_call_id: str | None = None


class ChatRequest(BaseModel):
    """The fields of an OpenAI chat-completions request that this server honours (others are ignored)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[_Message] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1, description="only one choice is generated")
    seed: int | None = None
    tools: list[dict] | None = None
    stream_options: dict | None = None


class RequestError(Exception):
    """A client error: HTTP status, OpenAI error type, message and offending parameter."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _text(content: str | list[dict] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise RequestError(400, "only text content parts are supported", "messages")
        parts.append(part["text"])
    return "".join(parts)


def to_langchain(messages: list[_Message]) -> list[BaseMessage]:
    """OpenAI chat messages as LangChain messages."""
    out: list[BaseMessage] = []
    for i, m in enumerate(messages):
        text = _text(m.content)
        if m.role in ("system", "developer"):
            out.append(SystemMessage(content=text))
        elif m.role == "user":
            out.append(HumanMessage(content=text))
        elif m.role == "assistant":
            calls = []
            for call in m.tool_calls or []:
                try:
                    fn = call["function"]
                    calls.append({"name": fn["name"], "args": json.loads(fn.get("arguments") or "{}"),
                                  "id": call.get("id"), "type": "tool_call"})
                except (KeyError, TypeError, ValueError):
                    raise RequestError(400, f"messages[{i}].tool_calls: each needs function.name and JSON "
                                            "function.arguments", f"messages[{i}].tool_calls") from None
            out.append(AIMessage(content=text, tool_calls=calls))
        else:
            if not m.tool_call_id:
                raise RequestError(400, f"messages[{i}]: a tool message needs tool_call_id", f"messages[{i}]")
            out.append(ToolMessage(content=text, tool_call_id=m.tool_call_id))
    return out


def _openai_tool_calls(message) -> list[dict]:
    return [{"id": c["id"], "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["args"])}} for c in message.tool_calls]


class Server:
    """The model behind the endpoint and the request handling, apart from HTTP."""

    def __init__(self, name: str, version: int | None = None):
        from .chat_models import load_llm

        self.llm = load_llm(name, version)
        self.model_id = self.llm.model_id  # NAME@VERSION
        self.name = self.model_id.partition("@")[0]
        self.created = int(time.time())
        self.context = getattr(self.llm.llm.pipeline.model.config, "max_position_embeddings", None)

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": m, "object": "model", "created": self.created,
                                            "owned_by": "agentpeft"} for m in (self.name, self.model_id)]}

    def parse(self, raw: bytes) -> tuple[ChatRequest, list[BaseMessage], dict]:
        """Validate a request body: the request, its messages and the generation arguments."""
        try:
            data = json.loads(raw or b"")
        except (ValueError, UnicodeDecodeError):
            raise RequestError(400, "the request body is not valid JSON") from None
        except RecursionError:
            data = None
        if data is None or _depth_over(data, MAX_JSON_DEPTH):
            raise RequestError(400, f"the request body's JSON is nested over {MAX_JSON_DEPTH} levels")
        if not isinstance(data, dict):
            raise RequestError(400, "the request body must be a JSON object")
        try:
            req = ChatRequest.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(map(str, first["loc"])) or None
            raise RequestError(400, f"{param}: {first['msg']}", param) from None
        if req.model not in (self.name, self.model_id):
            raise RequestError(404, f"the model {req.model!r} does not exist; this server serves {self.name!r}",
                               "model", "model_not_found")
        messages = to_langchain(req.messages)
        kwargs: dict[str, Any] = {}
        limit = req.max_completion_tokens or req.max_tokens
        if limit:
            kwargs["max_new_tokens"] = limit
        if req.temperature is not None:
            kwargs["temperature"] = req.temperature
        if req.top_p is not None:
            kwargs["top_p"] = req.top_p
        if req.seed is not None:
            kwargs["seed"] = req.seed
        if req.stop:
            kwargs["stop"] = [req.stop] if isinstance(req.stop, str) else req.stop
        if req.tools:
            from langchain_core.utils.function_calling import convert_to_openai_tool

            try:
                kwargs["tools"] = [convert_to_openai_tool(t) for t in req.tools]
            except Exception:
                raise RequestError(400, "tools: each tool needs type 'function' and a function object", "tools") from None
        if self.context:
            prompt = self.llm.prompt_tokens(messages, kwargs.get("tools"))
            wanted = kwargs.get("max_new_tokens", self.llm.generation_kwargs["max_new_tokens"])
            if prompt + wanted > self.context:
                raise RequestError(400, f"this model's context is {self.context} tokens; the messages take {prompt} "
                                        f"and max_tokens {wanted}: shorten the messages or lower max_tokens",
                                   "messages", "context_length_exceeded")
        return req, messages, kwargs

    def complete(self, messages: list[BaseMessage], kwargs: dict) -> dict:
        """The chat.completion object of a reply; ``kwargs["cancel"]``, a threading.Event, stops it early."""
        reply = self.llm.invoke(messages, **kwargs)
        usage = reply.usage_metadata or {}
        message: dict[str, Any] = {"role": "assistant", "content": reply.text}
        if reply.tool_calls:
            message["tool_calls"] = _openai_tool_calls(reply)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_id,
                "choices": [{"index": 0, "message": message, "logprobs": None,
                             "finish_reason": reply.response_metadata.get("finish_reason", "stop")}],
                "usage": {"prompt_tokens": usage.get("input_tokens", 0),
                          "completion_tokens": usage.get("output_tokens", 0),
                          "total_tokens": usage.get("total_tokens", 0)}}

    def stream(self, messages: list[BaseMessage], kwargs: dict, include_usage: bool):
        """The chat.completion.chunk objects of a streamed reply; closing it early stops the generation."""
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": self.model_id}

        def chunk(delta: dict, finish: str | None = None) -> dict:
            return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        yield chunk({"role": "assistant", "content": ""})
        finish, usage = "stop", {}
        pieces = self.llm.stream(messages, **kwargs)
        try:
            for piece in pieces:
                if piece.content:
                    yield chunk({"content": piece.content})
                if piece.tool_call_chunks:
                    yield chunk({"tool_calls": [
                        {"index": c["index"], "id": c["id"], "type": "function",
                         "function": {"name": c["name"], "arguments": c["args"] or ""}}
                        for c in piece.tool_call_chunks]})
                finish = piece.response_metadata.get("finish_reason", finish)
                usage = piece.usage_metadata or usage
        finally:
            pieces.close()  # a stream closed early stops its generation (and waits for it to stop)
        yield chunk({}, finish)
        if include_usage:
            yield {**base, "choices": [], "usage": {"prompt_tokens": usage.get("input_tokens", 0),
                                                    "completion_tokens": usage.get("output_tokens", 0),
                                                    "total_tokens": usage.get("total_tokens", 0)}}


def _depth_over(data: Any, limit: int) -> bool:
    """Whether parsed JSON nests lists and objects over ``limit`` levels (checked without recursion)."""
    todo = [(data, 1)]
    while todo:
        value, depth = todo.pop()
        if isinstance(value, (dict, list)):
            if depth > limit:
                return True
            todo.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return False


def _error_response(exc: RequestError):
    from fastapi.responses import JSONResponse

    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


# --- one generation at a time, a bounded queue ---------------------------------------------------------
class _Queue:
    """The model's turn: one holder, up to ``max_waiting`` waiters; a further request is refused (503)."""

    def __init__(self, max_waiting: int):
        self.max_waiting = max_waiting
        self.waiting = 0
        self.lock = asyncio.Lock()

    async def acquire(self, gone: asyncio.Event) -> bool:
        """Wait for the model; False (not holding it) when the client went away while waiting."""
        if self.lock.locked() and self.waiting >= self.max_waiting:
            raise RequestError(503, f"the server is busy: one request is generating and {self.waiting} are waiting; "
                                    "retry later", kind="server_error", code="server_busy",
                               headers={"Retry-After": str(RETRY_AFTER)})
        self.waiting += 1
        turn = asyncio.ensure_future(self.lock.acquire())
        left = asyncio.ensure_future(gone.wait())
        try:
            await asyncio.wait({turn, left}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.waiting -= 1
            left.cancel()
            if not turn.done():
                turn.cancel()  # a cancelled Lock.acquire never holds the lock
        if turn.done() and not turn.cancelled():
            if not gone.is_set():
                return True
            self.lock.release()
        return False

    def release(self) -> None:
        self.lock.release()


async def _watch(request, cancel: threading.Event, gone: asyncio.Event) -> None:
    """Sets ``cancel`` (which stops the generation) and ``gone`` once the client disconnects."""
    while not await request.is_disconnected():
        await asyncio.sleep(0.1)
    cancel.set()
    gone.set()


# --- callers: Host, Origin, API key --------------------------------------------------------------------
def _split_host(value: str) -> tuple[str, str | None]:
    """``host[:port]`` (IPv6 in brackets) as a lower-case host without brackets and the port, if any."""
    value = value.strip().lower()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else None
    host, sep, port = value.rpartition(":")
    return (host, port) if sep else (value, None)


def _normal_host(host: str) -> str:
    host = host.rstrip(".")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


class _Guard:
    """ASGI middleware that admits only same-machine callers (DNS rebinding and cross-origin browser
    requests are refused) holding the API key, when one is set."""

    def __init__(self, app, hosts: set[str], api_key: str | None):
        self.app, self.hosts = app, {_normal_host(h) for h in hosts}
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {}
        for name, value in scope["headers"]:
            headers.setdefault(name.decode("latin-1"), value.decode("latin-1"))
        error = self.check(scope, headers)
        if error is not None:
            return await _error_response(error)(scope, receive, send)
        await self.app(scope, receive, send)

    def check(self, scope, headers: dict[str, str]) -> RequestError | None:
        port = str((scope.get("server") or (None, None))[1])
        host, host_port = _split_host(headers.get("host", ""))
        if _normal_host(host) not in self.hosts or host_port not in (None, port):
            return RequestError(400, "invalid Host header: this server answers requests addressed to this machine "
                                     "(localhost, or a name given with --allowed-host) on its own port",
                                code="invalid_host")
        origin = headers.get("origin")
        if origin is not None:
            try:
                allowed = _normal_host(urlsplit(origin).hostname or "") in self.hosts
            except ValueError:
                allowed = False
            if not allowed:
                return RequestError(403, "cross-origin requests are refused", code="forbidden_origin",
                                    kind="permission_error")
        if self.key is not None and scope["path"].rstrip("/") != "/health":
            scheme, _, given = headers.get("authorization", "").partition(" ")
            if not (scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("latin-1"), self.key)):
                return RequestError(401, "invalid or missing API key: send Authorization: Bearer KEY",
                                    code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return None


# --- the app ---------------------------------------------------------------------------------------
async def _read_body(request, limit: int = MAX_BODY, timeout: float = BODY_TIMEOUT) -> bytes | None:
    """The body, at most ``limit`` bytes received within ``timeout`` seconds; None if the client left."""
    import anyio
    from starlette.requests import ClientDisconnect

    declared = request.headers.get("content-length")
    close = {"Connection": "close"}
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        status = 413 if declared.isdigit() else 400
        raise RequestError(status, f"the request body is over {limit} bytes" if status == 413 else
                           "invalid Content-Length header", headers=close)
    body = bytearray()
    try:
        with anyio.fail_after(timeout):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise RequestError(413, f"the request body is over {limit} bytes", headers=close)
    except TimeoutError:
        raise RequestError(408, f"the request body did not arrive within {timeout:g} s", headers=close) from None
    except ClientDisconnect:
        return None
    return bytes(body)


_INTERNAL = RequestError(500, "internal server error: generation failed (the server log has the details)",
                         kind="server_error")


def create_app(server: Server, api_key: str | None = None, hosts: set[str] | None = None,
               max_queue: int = MAX_QUEUE, body_timeout: float = BODY_TIMEOUT):
    """The ASGI app serving ``server``'s model; ``hosts``: the Host names accepted (loopback ones by default)."""
    import anyio
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="agentpeft", docs_url=None, redoc_url=None, openapi_url=None)
    queue = _Queue(max_queue)
    app.state.queue = queue

    @app.exception_handler(RequestError)
    async def request_error(request, exc: RequestError):
        return _error_response(exc)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        path = request.url.path
        if exc.status_code == 404:
            message = f"no route {request.method} {path}; use POST /v1/chat/completions or GET /v1/models"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {path}"
        else:
            message = str(exc.detail)
        return _error_response(RequestError(exc.status_code, message, headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):
        logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return _error_response(_INTERNAL)

    @app.get("/")
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": server.model_id}

    @app.get("/v1/models")
    async def models():
        return server.models()

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        for row in server.models()["data"]:
            if row["id"] == model_id:
                return row
        raise RequestError(404, f"the model {model_id!r} does not exist", "model", "model_not_found")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise RequestError(415, "the request body must be JSON sent with Content-Type: application/json",
                               headers={"Connection": "close"})
        raw = await _read_body(request, timeout=body_timeout)
        if raw is None:
            return Response(status_code=499)  # the client is gone
        req, messages, kwargs = await anyio.to_thread.run_sync(server.parse, raw)
        cancel, gone = threading.Event(), asyncio.Event()
        kwargs["cancel"] = cancel
        watcher = asyncio.ensure_future(_watch(request, cancel, gone))
        try:
            if not await queue.acquire(gone):
                watcher.cancel()
                return Response(status_code=499)  # the client left while waiting
        except BaseException:
            watcher.cancel()
            raise
        if req.stream:
            events = server.stream(messages, kwargs, bool((req.stream_options or {}).get("include_usage")))
            return _EventStream(_sse(events, cancel), on_close=lambda: (watcher.cancel(), queue.release()))
        try:
            reply = await anyio.to_thread.run_sync(server.complete, messages, kwargs)
        except Exception:
            logger.exception("generation failed")
            raise RequestError(500, _INTERNAL.message, kind="server_error") from None
        finally:
            cancel.set()
            watcher.cancel()
            queue.release()
        return JSONResponse(reply)

    class _EventStream(StreamingResponse):
        def __init__(self, content, on_close):
            super().__init__(content, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            self.on_close = on_close

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.on_close()

    return _Guard(app, hosts or set(LOOPBACK), api_key)


_END = object()


async def _sse(events, cancel: threading.Event):
    """Server-sent events of a chunk iterator run in worker threads, ``data: [DONE]`` last."""
    import anyio

    try:
        while True:
            try:
                event = await anyio.to_thread.run_sync(next, events, _END)
            except Exception:
                logger.exception("generation failed")
                yield f"data: {json.dumps(_INTERNAL.body())}\n\n"
                break
            if event is _END:
                break
            yield f"data: {json.dumps(event)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        cancel.set()
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(events.close)  # returns once the generation has stopped


# --- the HTTP server -------------------------------------------------------------------------------
def _protocol(header_timeout: float):
    """uvicorn's h11 protocol that closes a connection whose request line and headers take over
    ``header_timeout`` seconds (uvicorn itself bounds only idle keep-alive time)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        _header_timer = None
        _header_cycle = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm(None)

        def _arm(self, cycle) -> None:
            self._disarm()
            self._header_cycle = cycle
            self._header_timer = self.loop.call_later(header_timeout, self._expired)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expired(self) -> None:
            self._header_timer = None
            if self.cycle is self._header_cycle and not self.transport.is_closing():
                logger.info("closed a connection whose request headers took over %g s", header_timeout)
                self.transport.close()

        def handle_events(self) -> None:
            super().handle_events()
            if self._header_timer is not None and self.cycle is not self._header_cycle:
                self._disarm()  # a request's headers arrived

        def on_response_complete(self) -> None:
            done = self.cycle
            super().on_response_complete()
            if self.cycle is done and not self.transport.is_closing():
                self._arm(done)

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return Protocol


class ModelServer:
    """A bound, not yet serving, HTTP server for one registered model (uvicorn over its own socket)."""

    def __init__(self, model: Server, sock: socket.socket, app, *, limit_concurrency: int = LIMIT_CONCURRENCY,
                 header_timeout: float = HEADER_TIMEOUT, keep_alive: int = KEEP_ALIVE, log_level: str = "warning",
                 log_config: dict | None = None):
        import uvicorn

        self.model, self.socket, self.app = model, sock, app
        self.model_id = model.model_id
        self.server_address = sock.getsockname()[:2]
        config = uvicorn.Config(app, http=_protocol(header_timeout), ws="none", lifespan="off",
                                timeout_keep_alive=keep_alive, limit_concurrency=limit_concurrency,
                                timeout_graceful_shutdown=10, proxy_headers=False, server_header=False,
                                log_level=log_level, log_config=log_config, access_log=log_config is not None)
        self.uvicorn = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def queue(self) -> _Queue:
        """The model's queue (one generating, the rest waiting)."""
        return self.app.app.state.queue

    @property
    def url(self) -> str:
        host, port = self.server_address
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"

    def serve_forever(self) -> None:
        """Serve until ``shutdown`` (or, in the main thread, Ctrl-C / SIGTERM)."""
        self.uvicorn.run(sockets=[self.socket])

    def start(self) -> "ModelServer":
        """Serve from a background thread; returns once the server accepts requests."""
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        while not self.uvicorn.started:
            if not self._thread.is_alive():
                raise RuntimeError("the server stopped while starting")
            time.sleep(0.02)
        return self

    def shutdown(self) -> None:
        self.uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)

    def server_close(self) -> None:
        self.socket.close()


def _bind(host: str, port: int) -> socket.socket:
    from .errors import AgentpeftError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise AgentpeftError(f"cannot listen on {host}:{port}: {exc.strerror}; pick another --host") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise AgentpeftError(f"cannot listen on {host}:{port}: {exc.strerror}; pick another --port or --host") from None
    sock.setblocking(False)
    return sock


def make_server(name: str, host: str = "127.0.0.1", port: int = 8000, version: int | None = None, *,
                api_key: str | None = None, max_queue: int = MAX_QUEUE,
                limit_concurrency: int = LIMIT_CONCURRENCY, header_timeout: float = HEADER_TIMEOUT,
                body_timeout: float = BODY_TIMEOUT, keep_alive: int = KEEP_ALIVE,
                allowed_hosts: tuple[str, ...] = (), log_config: dict | None = None) -> ModelServer:
    """A ready (bound, not yet serving) HTTP server for a registered model; port 0 picks a free port.

    ``api_key``: required as ``Authorization: Bearer KEY`` when set. ``allowed_hosts``: Host names
    accepted besides the loopback ones and ``host`` itself. ``log_config``: uvicorn's logging
    configuration (None: uvicorn logs warnings only and no access log).
    """
    from .errors import AgentpeftError

    if max_queue < 0 or limit_concurrency < 1:
        raise AgentpeftError(f"max_queue must be at least 0 ({max_queue}) and limit_concurrency at least 1 "
                             f"({limit_concurrency})")
    sock = _bind(host, port)
    try:
        model = Server(name, version)
    except BaseException:
        sock.close()
        raise
    hosts = {*LOOPBACK, *allowed_hosts}
    if host not in ("", "0.0.0.0", "::"):
        hosts.add(host)
    app = create_app(model, api_key=api_key, hosts=hosts, max_queue=max_queue, body_timeout=body_timeout)
    return ModelServer(model, sock, app, limit_concurrency=limit_concurrency, header_timeout=header_timeout,
                       keep_alive=keep_alive, log_level="info" if log_config else "warning", log_config=log_config)


def serve(name: str, host: str = "127.0.0.1", port: int = 8000, version: int | None = None, log=print, *,
          api_key: str | None = None, max_queue: int = MAX_QUEUE, limit_concurrency: int = LIMIT_CONCURRENCY,
          allowed_hosts: tuple[str, ...] = ()) -> None:
    """Serve a registered model until interrupted; ``api_key`` defaults to $AGENTPEFT_API_KEY."""
    from uvicorn.config import LOGGING_CONFIG

    if api_key is None:
        api_key = os.environ.get("AGENTPEFT_API_KEY") or None
    if not logging.getLogger().handlers and not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    httpd = make_server(name, host, port, version, api_key=api_key, max_queue=max_queue,
                        limit_concurrency=limit_concurrency, allowed_hosts=allowed_hosts, log_config=LOGGING_CONFIG)
    log(f"serving {httpd.model_id} at {httpd.url} (OpenAI-compatible); Ctrl-C stops")
    if host not in LOOPBACK:
        log(f"warning: listening on {host}, reachable from other machines"
            + ("" if api_key else "; there is no API key (--api-key or AGENTPEFT_API_KEY)"))
        if host in ("", "0.0.0.0", "::") and not allowed_hosts:
            log("note: requests must name a loopback Host; add this machine's names with --allowed-host")
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
