"""Registered and base models as LangChain chat models: ``load_llm`` and ``chat_model``.

Below both the pipeline (the evaluation's judge, the dataset's teacher) and the use layer
(``agentpeft.langchain``: tools and agents), which both ask models through it.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import (AIMessage, AIMessageChunk, BaseMessage, ChatMessage, HumanMessage,
                                     SystemMessage, ToolMessage)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_huggingface import ChatHuggingFace, HuggingFacePipeline
from pydantic import Field, PrivateAttr

from . import registry
from .errors import AgentpeftError
from .models import for_inference, tool_format


@dataclass
class _Loaded:
    model: Any
    tokenizer: Any
    manifest: dict
    #: One generation at a time per model: batch() and the server call it from several threads.
    lock: threading.Lock = field(default_factory=threading.Lock)


_models: dict[str, _Loaded] = {}
_cache_lock = threading.Lock()

_GENERATION_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "do_sample", "repetition_penalty", "seed")
_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
_TAG = "<tool_call>"


class SpecialistChat(ChatHuggingFace):
    """ChatHuggingFace over a local transformers pipeline, for a registered specialist.

    A subclass, because for a local pipeline ChatHuggingFace (1) has no default system prompt, and the
    model was trained with one; (2) rejects tool messages and a last message that is not a HumanMessage,
    and silently ignores bound tools, so it cannot sit in an agent loop; (3) raises NotImplementedError
    on ainvoke/astream; (4) streams through HuggingFacePipeline._stream, which ignores stop strings,
    reports each token to callbacks twice and hangs 60 s when generation fails. Generation itself
    still goes through its HuggingFacePipeline.
    """

    system_prompt: str | None = None
    generation_kwargs: dict[str, Any] = Field(default_factory=dict)
    #: Retrieval-augmented mode: question -> passages put before the last user question.
    retrieve: Any = None
    _gen_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    #: (chat template, its tool format): worked out once per template.
    _tool_format: tuple[Any, str] | None = PrivateAttr(default=None)

    # BaseChatModel's own async versions run the sync ones in an executor thread.
    _agenerate = BaseChatModel._agenerate
    _astream = BaseChatModel._astream

    @property
    def _llm_type(self) -> str:
        return "agentpeft-specialist"

    # --- prompt ---------------------------------------------------------------------------------
    @property
    def tool_format(self) -> str:
        """How tools reach this model: ``"chat-template"`` (its chat template's own tool support) or
        ``"agentpeft"`` (described in the system prompt; see ``agentpeft.models.TOOL_FORMATS``)."""
        template = self.tokenizer.chat_template
        if self._tool_format is None or self._tool_format[0] != template:
            self._tool_format = (template, tool_format(self.tokenizer))
        return self._tool_format[1]

    def chat_messages(self, messages: list[BaseMessage], tools: list[dict] | None = None) -> list[dict]:
        """Message dicts for the chat template, system prompt first. With the ``chat-template`` tool format,
        tool calls and results are ``tool_calls`` and ``tool`` messages and the template renders the tools
        (``_to_chat_prompt`` passes them); with ``agentpeft``, they are text and the tools are described
        in the system prompt."""
        native = self.tool_format == "chat-template"
        out: list[dict] = []
        for m in messages:
            if isinstance(m, SystemMessage):
                out.append({"role": "system", "content": m.text})
            elif isinstance(m, HumanMessage):
                out.append({"role": "user", "content": m.text})
            elif isinstance(m, AIMessage) and native:
                out.append({"role": "assistant", "content": m.text})
                if m.tool_calls:
                    out[-1]["tool_calls"] = [
                        {"type": "function", "function": {"name": c["name"], "arguments": c["args"]},
                         **({"id": c["id"]} if c.get("id") else {})} for c in m.tool_calls]
            elif isinstance(m, ToolMessage) and native:
                out.append({"role": "tool", "content": m.text, "tool_call_id": m.tool_call_id,
                            **({"name": m.name} if m.name else {})})
            elif isinstance(m, AIMessage):
                calls = "".join(f"\n{_TAG}{json.dumps({'name': c['name'], 'arguments': c['args']})}</tool_call>"
                                for c in m.tool_calls)
                out.append({"role": "assistant", "content": (m.text + calls).strip()})
            elif isinstance(m, ToolMessage):
                # As a user turn: every chat template knows "user", not every one knows "tool".
                out.append({"role": "user", "content": f"<tool_response>\n{m.text}\n</tool_response>"})
            elif isinstance(m, ChatMessage):
                out.append({"role": m.role, "content": m.text})
            else:
                raise ValueError(f"unsupported message type {type(m).__name__}")
        if self.retrieve is not None and out and out[-1]["role"] == "user" and isinstance(messages[-1], HumanMessage):
            from .retrieval import augment_question

            question = out[-1]["content"]
            out[-1] = {"role": "user", "content": augment_question(question, self.retrieve(question))}
        if self.system_prompt and not (out and out[0]["role"] == "system"):
            out.insert(0, {"role": "system", "content": self.system_prompt})
        if tools and not native:
            note = _tool_instructions(tools)
            if out and out[0]["role"] == "system":
                out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{note}"}
            else:
                out.insert(0, {"role": "system", "content": note})
        return out

    def _to_chat_prompt(self, messages: list[BaseMessage], tools: list[dict] | None = None) -> str:
        if not messages:
            raise ValueError("at least one message is needed")
        native = {"tools": tools} if tools and self.tool_format == "chat-template" else {}
        return self.tokenizer.apply_chat_template(self.chat_messages(messages, tools), tokenize=False,
                                                  add_generation_prompt=True, **native)

    def count_tokens(self, text: str) -> int:
        """Tokens in ``text`` (a rendered prompt or a reply)."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_tokens(self, messages: list[BaseMessage], tools: list[dict] | None = None) -> int:
        """Length in tokens of the prompt these messages render to."""
        return self.count_tokens(self._to_chat_prompt(messages, tools))

    def _generation(self, kwargs: dict, stop: list[str] | None) -> dict:
        gen = {**self.generation_kwargs, **(kwargs.pop("pipeline_kwargs", None) or {})}
        gen.update({k: kwargs.pop(k) for k in _GENERATION_KEYS if k in kwargs})
        if "temperature" in gen and not gen["temperature"]:
            gen.pop("temperature")
            gen["do_sample"] = False
        elif gen.get("temperature"):
            gen.setdefault("do_sample", True)
        cancel = kwargs.pop("cancel", None)
        criteria = [*([_StopOnText(self.tokenizer, stop)] if stop else []), *([_StopOnEvent(cancel)] if cancel else [])]
        if criteria:
            from transformers import StoppingCriteriaList

            gen["stopping_criteria"] = StoppingCriteriaList(criteria)
        return gen

    @contextmanager
    def _generating(self, gen: dict):
        """Holds the model's generation lock; a ``seed`` in ``gen`` (removed from it) seeds torch's RNG for
        this generation only: the process-wide state is forked here and restored afterwards."""
        seed = gen.pop("seed", None)
        with self._gen_lock:
            if seed is None:
                yield
                return
            import torch

            cuda = range(torch.cuda.device_count()) if torch.cuda.is_available() else []
            with torch.random.fork_rng(devices=cuda):
                torch.manual_seed(int(seed))
                yield

    def _message(self, text: str, prompt: str, gen: dict, tools: list[dict] | None) -> tuple[str, list, list, dict]:
        content, calls, invalid = (parse_tool_calls(text, bare_json=self.tool_format == "chat-template")
                                   if tools else (text, [], []))
        out_tokens = self.count_tokens(text)
        finish = ("tool_calls" if calls else
                  "length" if out_tokens >= gen.get("max_new_tokens", 1 << 30) else "stop")
        in_tokens = self.count_tokens(prompt)
        usage = {"input_tokens": in_tokens, "output_tokens": out_tokens, "total_tokens": in_tokens + out_tokens}
        return content, calls, invalid, {"finish_reason": finish, "usage": usage}

    # --- generation -------------------------------------------------------------------------------
    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        tools = _pop_tools(kwargs)
        prompt = self._to_chat_prompt(messages, tools)
        gen = self._generation(kwargs, stop)
        with self._generating(gen):
            result = self.llm._generate(prompts=[prompt], pipeline_kwargs=gen)
        text = _cut_at_stop(result.generations[0][0].text, stop)
        content, calls, invalid, info = self._message(text, prompt, gen, tools)
        message = AIMessage(content=content, tool_calls=calls, invalid_tool_calls=invalid,
                            usage_metadata=info["usage"], response_metadata={"model_name": self.model_id})
        return ChatResult(generations=[ChatGeneration(message=message,
                                                      generation_info={"finish_reason": info["finish_reason"]})])

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        from transformers import TextIteratorStreamer

        tools = _pop_tools(kwargs)
        kwargs.pop("stream_usage", None)
        prompt = self._to_chat_prompt(messages, tools)
        # A stream closed before its end (a consumer that stops reading) stops the generation too.
        if "cancel" not in kwargs:
            kwargs["cancel"] = threading.Event()
        cancel = kwargs["cancel"]
        gen = self._generation(kwargs, stop)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with self._generating(gen):
                    self.llm.pipeline(prompt, streamer=streamer, **gen)
            except BaseException as exc:  # handed to the consumer below
                errors.append(exc)
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        holds = [*(stop or []), *([_TAG] if tools else [])]
        # A reply that may be a bare JSON call (the chat-template format of Llama 3.1, Mistral) waits for its end.
        bare = bool(tools) and self.tool_format == "chat-template"
        text, sent = "", 0
        try:
            for piece in streamer:
                text += piece
                safe = "" if bare and text.lstrip()[:1] in ("", "{", "[") else _safe_prefix(text, holds)
                if len(safe) > sent:
                    yield ChatGenerationChunk(message=AIMessageChunk(content=safe[sent:]))
                    sent = len(safe)
        finally:
            if worker.is_alive():
                cancel.set()
                worker.join()
        if errors:
            raise errors[0]
        text = _cut_at_stop(text, stop)
        content, calls, invalid, info = self._message(text, prompt, gen, tools)
        if len(content) > sent:
            yield ChatGenerationChunk(message=AIMessageChunk(content=content[sent:]))
        chunks = [{"name": c["name"], "args": json.dumps(c["args"]), "id": c["id"], "index": i}
                  for i, c in enumerate(calls)]
        chunks += [{"name": c.get("name"), "args": c.get("args"), "id": c["id"], "index": len(chunks) + i}
                   for i, c in enumerate(invalid)]
        last = AIMessageChunk(content="", tool_call_chunks=chunks, usage_metadata=info["usage"],
                              chunk_position="last")
        yield ChatGenerationChunk(message=last, generation_info={"finish_reason": info["finish_reason"],
                                                                 "model_name": self.model_id})


class _StopOnEvent:
    """Stops generation once an event is set (transformers StoppingCriteria): a caller's cancellation."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _StopOnText:
    """Stops generation once the generated text contains a stop string (transformers StoppingCriteria)."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop, self.start = tokenizer, stop, None

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        if self.start is None:
            self.start = input_ids.shape[1] - 1
        done = [any(s in self.tokenizer.decode(row[self.start:], skip_special_tokens=True) for s in self.stop)
                for row in input_ids]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _pop_tools(kwargs: dict) -> list[dict] | None:
    kwargs.pop("tool_choice", None)
    kwargs.pop("stream", None)
    return kwargs.pop("tools", None) or None


def _tool_instructions(tools: list[dict]) -> str:
    specs = "\n".join(json.dumps(t.get("function", t)) for t in tools)
    return (f"You can call these tools:\n<tools>\n{specs}\n</tools>\n"
            'To call a tool, reply with only <tool_call>{"name": "TOOL", "arguments": {...}}</tool_call>. '
            "Tool results come back inside <tool_response></tool_response>.")


def _tool_call(data: Any) -> dict | None:
    """A LangChain tool call from a parsed ``{"name": ..., "arguments": {...}}`` (or ``"parameters"``,
    ``"args"``, arguments as a JSON string, the object inside ``"function"``); None if it is not one."""
    if isinstance(data, dict) and "name" not in data and isinstance(data.get("function"), dict):
        data = data["function"]
    if not isinstance(data, dict):
        return None
    args = next((data[k] for k in ("arguments", "parameters", "args") if k in data), {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(data.get("name"), str) or not isinstance(args, dict):
        return None
    return {"name": data["name"], "args": args, "id": f"call_{uuid.uuid4().hex[:16]}", "type": "tool_call"}


def _bare_calls(text: str) -> list[dict]:
    """The calls of a reply that is nothing but a JSON call or a JSON list of calls (after Llama 3.1's
    ``<|python_tag|>`` or Mistral's ``[TOOL_CALLS]``, where decoding kept them); [] for any other reply."""
    body = text.strip()
    for marker in ("<|python_tag|>", "[TOOL_CALLS]"):
        body = body.removeprefix(marker).strip()
    if body[:1] not in ("{", "["):
        return []
    try:
        data = json.loads(body)
    except ValueError:
        return []
    calls = [_tool_call(d) for d in (data if isinstance(data, list) else [data])]
    return calls if calls and all(calls) else []


def parse_tool_calls(text: str, bare_json: bool = False) -> tuple[str, list[dict], list[dict]]:
    """Split a reply into its text and the ``<tool_call>{json}</tool_call>`` calls in it (Qwen's and Hermes'
    format, and agentpeft's own). ``bare_json`` also reads a reply that is only a JSON call or list of
    calls, as the chat templates of Llama 3.1 and Mistral have a model reply."""
    if bare_json and (calls := _bare_calls(text)):
        return "", calls, []
    start = text.find(_TAG)
    if start < 0:
        return text, [], []
    calls, invalid = [], []
    for raw in _TOOL_CALL.findall(text[start:]):
        try:
            call = _tool_call(json.loads(raw))
        except ValueError:
            call = None
        if call:
            calls.append(call)
        else:
            invalid.append({"name": None, "args": raw, "id": f"call_{uuid.uuid4().hex[:16]}",
                            "error": "not a JSON tool call", "type": "invalid_tool_call"})
    return text[:start], calls, invalid


def _cut_at_stop(text: str, stop: list[str] | None) -> str:
    cut = min((i for i in (text.find(s) for s in stop or []) if i >= 0), default=len(text))
    return text[:cut]


def _safe_prefix(text: str, holds: list[str]) -> str:
    """``text`` up to the first hold string, minus a tail that could still become one."""
    text = _cut_at_stop(text, holds)
    keep = len(text)
    for h in holds:
        for n in range(min(len(h) - 1, len(text)), 0, -1):
            if text.endswith(h[:n]):
                keep = min(keep, len(text) - n)
                break
    return text[:keep]


def _ref(name: str, version: int | None = None) -> str:
    """``NAME@VERSION`` of a registered model (the latest version when none is given)."""
    path = registry.resolve(f"{name}@{version}" if version is not None else name)
    return f"{path.parent.name}@{path.name}"


def _load(ref: str) -> _Loaded:
    """Model, tokenizer and manifest of a registered version, loaded once per process."""
    key = str(registry.resolve(ref))
    with _cache_lock:
        if key not in _models:
            model, tokenizer, manifest = registry.load(ref)
            _models[key] = _Loaded(for_inference(model), tokenizer, manifest)
        return _models[key]


def _chat(model, tokenizer, model_id: str, system_prompt: str | None, lock: threading.Lock | None = None,
          **generation_kwargs: Any) -> SpecialistChat:
    from transformers import pipeline

    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer, return_full_text=False)
    gen = {"max_new_tokens": 256, "do_sample": False, **generation_kwargs}
    chat = SpecialistChat(llm=HuggingFacePipeline(pipeline=pipe, model_id=model_id), tokenizer=tokenizer,
                          model_id=model_id, system_prompt=system_prompt, generation_kwargs=gen,
                          max_tokens=gen["max_new_tokens"])
    chat._gen_lock = lock or threading.Lock()
    return chat


def load_llm(name: str, version: int | None = None, **generation_kwargs: Any) -> SpecialistChat:
    """A LangChain chat model over a registered model (``name``, or ``name@version``).

    ``generation_kwargs`` (``max_new_tokens``, ``do_sample``, ``temperature``, ...) go to generation;
    the default is greedy decoding with up to 256 new tokens. Per call, pass the same keys to
    ``invoke``/``stream`` or ``pipeline_kwargs={...}``. The model computes as its evaluation did
    (``agentpeft.models.for_inference``: bf16 matmuls where the hardware has native bf16).
    """
    if "@" in name and version is None:
        name, version = registry.parse_ref(name)
    ref = _ref(name, version)
    loaded = _load(ref)
    chat = _chat(loaded.model, loaded.tokenizer, ref, loaded.manifest.get("system_prompt"), loaded.lock,
                 **generation_kwargs)
    retrieval = loaded.manifest.get("retrieval") or {}
    if retrieval.get("enabled") is True:  # as the evaluation asked it: the top k passages before the question
        from .retrieval import KB_FILE, PassageIndex, load_chunks, retrieve

        index = PassageIndex(load_chunks(registry.resolve(ref) / KB_FILE))
        chat.retrieve = lambda question: retrieve(index, question, retrieval["k"])
    return chat


def chat_model(spec: str, base: str | None = None, **generation_kwargs: Any) -> BaseChatModel:
    """Any chat model by name: ``provider:model`` (through ``init_chat_model``), a registered model
    (``NAME[@VERSION]``), ``base`` (the base model ``base``, default the default one), or a base model."""
    from .models import load_model, load_tokenizer, resolve_base

    spec = (spec or "").strip()
    provider, sep, model_name = spec.partition(":")
    if sep and provider.isidentifier() and model_name and not Path(spec).exists():
        from langchain.chat_models import init_chat_model

        try:
            return init_chat_model(spec, **generation_kwargs)
        except Exception as exc:  # a missing provider package or API key: a user error, said in one line
            first = str(exc).strip().splitlines()
            raise AgentpeftError(
                f"chat model {spec!r} could not be created ({type(exc).__name__}: {first[0] if first else ''}); "
                "install the provider's LangChain package (e.g. langchain-openai) and set its API key") from None
    try:
        registry.resolve(spec)
        return load_llm(spec, **generation_kwargs)
    except AgentpeftError:
        pass
    try:
        folder = resolve_base(base if spec == "base" else spec, log=lambda s: None)
    except AgentpeftError:
        raise AgentpeftError(
            f"{spec!r} is neither 'base', a registered model (see `agentpeft list`), a base model, nor a "
            "provider:model string such as openai:gpt-4o-mini") from None
    return _chat(for_inference(load_model(folder)), load_tokenizer(folder), f"base:{folder.name}", None,
                 **generation_kwargs)
