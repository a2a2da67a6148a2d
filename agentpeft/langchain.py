"""Registered models as LangChain chat models."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import BaseMessage, SystemMessage
from langchain_huggingface import ChatHuggingFace, HuggingFacePipeline

from . import registry

_models: dict[str, tuple[Any, Any]] = {}
_lock = threading.Lock()


class SpecialistChat(ChatHuggingFace):
    """ChatHuggingFace that puts the recipe's system prompt first.

    ChatHuggingFace has no notion of a default system prompt, and the model was trained with one,
    so the prompt is added here when the caller's messages do not start with their own.
    """

    system_prompt: str | None = None

    def _to_chat_prompt(self, messages: list[BaseMessage]) -> str:
        if self.system_prompt and not (messages and isinstance(messages[0], SystemMessage)):
            messages = [SystemMessage(content=self.system_prompt), *messages]
        return super()._to_chat_prompt(messages)


def _load(ref: str):
    """Model, tokenizer and manifest of a registered version, loaded once per process."""
    key = str(registry.resolve(ref))
    with _lock:
        if key not in _models:
            _models[key] = registry.load(ref)
        return _models[key]


def _chat(model, tokenizer, model_id: str, system_prompt: str | None, **generation_kwargs: Any) -> SpecialistChat:
    from transformers import pipeline

    kwargs = {"max_new_tokens": 256, "do_sample": False, **generation_kwargs}
    # Generation settings live on the transformers pipeline: HuggingFacePipeline only forwards
    # per-call pipeline_kwargs, and its streaming path calls the pipeline directly.
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer, return_full_text=False, **kwargs)
    llm = HuggingFacePipeline(pipeline=pipe, model_id=model_id)
    return SpecialistChat(llm=llm, tokenizer=tokenizer, model_id=model_id, system_prompt=system_prompt)


def load_llm(name: str, version: int | None = None, **generation_kwargs: Any) -> BaseChatModel:
    """A LangChain chat model over a registered model (``name``, or ``name@version``).

    ``generation_kwargs`` (``max_new_tokens``, ``do_sample``, ``temperature``, ...) go to generation;
    the default is greedy decoding with up to 256 new tokens.
    """
    ref = f"{name}@{version}" if version is not None else name
    model, tokenizer, manifest = _load(ref)
    return _chat(model, tokenizer, f"{manifest['name']}@{manifest['version']}", manifest.get("system_prompt"),
                 **generation_kwargs)


def chat_model(spec: str, base: str | None = None, **generation_kwargs: Any) -> BaseChatModel:
    """Any chat model by name: ``provider:model`` (through ``init_chat_model``), a registered model
    (``NAME[@VERSION]``), ``base`` (the base model ``base``, default the default one), or a base model."""
    from .errors import AgentpeftError
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
    return _chat(load_model(folder), load_tokenizer(folder), f"base:{folder.name}", None, **generation_kwargs)
