"""The use layer: registered models as LangChain chat models, their tools, and agents built on them.

The chat models live in ``agentpeft.chat_models`` and the tool selection in ``agentpeft.tools``
(both below the pipeline); they are re-exported here, where applications import them from.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from langchain_core.language_models import BaseChatModel
from langchain_core.tools import BaseTool

from . import registry
from .chat_models import SpecialistChat, _chat, _ref, chat_model, load_llm, parse_tool_calls  # noqa: F401
from .errors import AgentpeftError
from .tools import ask_tool_name, collect_tools  # noqa: F401

if TYPE_CHECKING:
    from .recipe import Recipe


def recipe_for(ref: str) -> "Recipe":
    """The recipe a registered model was built from, with the tools recorded at build time."""
    from .recipe import Recipe, get_recipe

    manifest = registry.show(ref)
    try:
        recipe = get_recipe(manifest["recipe"])
    except AgentpeftError:  # built from a recipe file that is not registered: rebuild it from the manifest
        recipe = Recipe(name=manifest["recipe"], system_prompt=manifest.get("system_prompt") or "",
                        description=manifest.get("description", ""), knowledge_base=manifest.get("knowledge_base"))
    if "tools" in manifest:
        recipe = recipe.model_copy(update={"tools": list(manifest["tools"])})
    return recipe


def get_tools(name: str, version: int | None = None) -> list[BaseTool]:
    """The tools of a registered model: its recipe's tools plus ``ask_<name>``, the model itself."""
    if "@" in name and version is None:
        name, version = registry.parse_ref(name)
    ref = _ref(name, version)
    return collect_tools(recipe_for(ref), ref)


ORCHESTRATOR_PROMPT = ("You are a helpful assistant with tools. For questions about {topic}, call {ask} "
                       "and base your answer on what it returns; use the other tools when the user asks for them.")


def create_agent(name: str, model: BaseChatModel | str | None = None,
                 tools: Sequence[BaseTool | str] | None = None, **kwargs: Any):
    """A LangChain agent (``langchain.agents.create_agent``) around a registered model.

    With no ``model`` the specialist itself is the agent's model, with its recipe's tools. With a
    tool-calling ``model`` (a chat model, or a "provider:model" string), that model orchestrates and the
    specialist is one of its tools (``ask_<name>``). ``tools`` picks tools by name or adds your own;
    other keyword arguments (``system_prompt``, ``checkpointer``, ...) go to LangChain's constructor.
    """
    from langchain.agents import create_agent as langchain_create_agent

    if "@" in name:
        name, version = registry.parse_ref(name)
    else:
        version = None
    ref = _ref(name, version)
    available = {t.name: t for t in get_tools(name, version)}
    if tools is None:
        chosen = list(available.values())
        if model is None:  # the specialist does not need a tool that asks itself
            chosen = [t for t in chosen if t.name != ask_tool_name(ref)]
    else:
        chosen = []
        for item in tools:
            if isinstance(item, str):
                if item not in available:
                    raise AgentpeftError(f"{ref} has no tool {item!r}; its tools: {', '.join(available) or 'none'}")
                chosen.append(available[item])
            else:
                chosen.append(item)
    if model is None:
        model = load_llm(name, version)
    else:
        description = registry.show(ref).get("description") or ref
        kwargs.setdefault("system_prompt", ORCHESTRATOR_PROMPT.format(topic=description, ask=ask_tool_name(ref)))
    return langchain_create_agent(model, chosen, **kwargs)
