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


def chat_model(spec: str, **generation_kwargs: Any) -> BaseChatModel:
    """Any chat model by name: ``provider:model`` (through ``init_chat_model``), a registered model
    (``NAME[@VERSION]``), or a base model (``base`` for the default, an alias or a local folder)."""
    from .errors import AgentpeftError
    from .models import load_model, load_tokenizer, resolve_base

    provider, sep, model_name = spec.partition(":")
    if sep and provider.isidentifier() and model_name and not Path(spec).exists():
        from langchain.chat_models import init_chat_model

        try:
            return init_chat_model(spec, **generation_kwargs)
        except Exception as exc:  # missing integration package, API key, unknown provider
            raise AgentpeftError(f"cannot use chat model {spec!r}: {exc}") from None
    try:
        registry.resolve(spec)
    except AgentpeftError:
        base = resolve_base(None if spec == "base" else spec, log=lambda s: None)
        return _chat(load_model(base), load_tokenizer(base), spec, None, **generation_kwargs)
    return load_llm(spec, **generation_kwargs)
