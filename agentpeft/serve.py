"""An OpenAI-compatible HTTP endpoint for a registered model (stdlib server, no extra dependencies).

``POST /v1/chat/completions`` (JSON, or server-sent events with ``stream: true``) and ``GET /v1/models``.
"""

from __future__ import annotations

import json
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage
from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_BODY = 1 << 20  # bytes


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
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

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
        from .langchain import load_llm

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
        """The chat.completion.chunk objects of a streamed reply."""
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": self.model_id}

        def chunk(delta: dict, finish: str | None = None) -> dict:
            return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        yield chunk({"role": "assistant", "content": ""})
        finish, usage = "stop", {}
        for piece in self.llm.stream(messages, **kwargs):
            if piece.content:
                yield chunk({"content": piece.content})
            if piece.tool_call_chunks:
                yield chunk({"tool_calls": [
                    {"index": c["index"], "id": c["id"], "type": "function",
                     "function": {"name": c["name"], "arguments": c["args"] or ""}} for c in piece.tool_call_chunks]})
            finish = piece.response_metadata.get("finish_reason", finish)
            usage = piece.usage_metadata or usage
        yield chunk({}, finish)
        if include_usage:
            yield {**base, "choices": [], "usage": {"prompt_tokens": usage.get("input_tokens", 0),
                                                    "completion_tokens": usage.get("output_tokens", 0),
                                                    "total_tokens": usage.get("total_tokens", 0)}}


def _handler(server: Server, log) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "agentpeft"

        def log_message(self, format: str, *args) -> None:  # noqa: A002 (the stdlib's name)
            if log:
                log(f"{self.address_string()} {format % args}")

        def _json(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, exc: RequestError) -> None:
            self._json(exc.status, exc.body())

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0].rstrip("/")
            if path == "/v1/models":
                return self._json(200, server.models())
            if path.startswith("/v1/models/"):
                wanted = path[len("/v1/models/"):]
                for row in server.models()["data"]:
                    if row["id"] == wanted:
                        return self._json(200, row)
                return self._error(RequestError(404, f"the model {wanted!r} does not exist", "model", "model_not_found"))
            if path in ("", "/health"):
                return self._json(200, {"status": "ok", "model": server.model_id})
            self._error(RequestError(404, f"no route GET {path}; use POST /v1/chat/completions or GET /v1/models"))

        def do_POST(self) -> None:
            path = self.path.split("?", 1)[0].rstrip("/")
            if path != "/v1/chat/completions":
                return self._error(RequestError(404, f"no route POST {path}; use POST /v1/chat/completions"))
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                return self._error(RequestError(400, "invalid Content-Length header"))
            if length > MAX_BODY:
                return self._error(RequestError(413, f"the request body is over {MAX_BODY} bytes"))
            try:
                req, messages, kwargs = server.parse(self.rfile.read(length))
                if not req.stream:
                    return self._json(200, server.complete(messages, kwargs))
            except RequestError as exc:
                return self._error(exc)
            except Exception as exc:  # a generation failure is the server's, reported as JSON
                return self._error(RequestError(500, f"generation failed: {type(exc).__name__}: {exc}",
                                                kind="server_error"))
            self._sse(server.stream(messages, kwargs, bool((req.stream_options or {}).get("include_usage"))))

        def _sse(self, events) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            try:
                try:
                    for event in events:
                        self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    return
                except Exception as exc:  # headers are sent: report the failure as an error event
                    error = RequestError(500, f"generation failed: {type(exc).__name__}: {exc}", kind="server_error")
                    self.wfile.write(f"data: {json.dumps(error.body())}\n\n".encode())
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                pass

    return Handler


def make_server(name: str, host: str = "127.0.0.1", port: int = 8000, version: int | None = None,
                log=None) -> ThreadingHTTPServer:
    """A ready (not yet serving) HTTP server for a registered model; port 0 picks a free port."""
    from .errors import AgentpeftError

    server = Server(name, version)
    try:
        httpd = ThreadingHTTPServer((host, port), _handler(server, log))
    except OSError as exc:
        raise AgentpeftError(f"cannot listen on {host}:{port}: {exc.strerror}; pick another --port or --host") from None
    httpd.daemon_threads = True
    httpd.model_id = server.model_id  # type: ignore[attr-defined]
    return httpd


def serve(name: str, host: str = "127.0.0.1", port: int = 8000, version: int | None = None, log=print) -> None:
    """Serve a registered model until interrupted."""
    httpd = make_server(name, host, port, version, log=log)
    bound_host, bound_port = httpd.server_address[:2]
    log(f"serving {httpd.model_id} at http://{bound_host}:{bound_port}/v1 (OpenAI-compatible); Ctrl-C stops")
    if host not in ("127.0.0.1", "localhost", "::1"):
        log(f"warning: listening on {host}, reachable from other machines; there is no authentication")
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
