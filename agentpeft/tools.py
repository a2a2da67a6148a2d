"""The tools plugins register (``register_tools``), selected for a recipe and a registered model."""

from __future__ import annotations

from typing import TYPE_CHECKING

from langchain_core.tools import BaseTool

from .errors import AgentpeftError

if TYPE_CHECKING:
    from .recipe import Recipe


def ask_tool_name(ref: str) -> str:
    """The name of the tool that asks a registered model: ``ask_<name>``."""
    return "ask_" + ref.partition("@")[0].replace(".", "_")


def collect_tools(recipe: "Recipe | None" = None, model: str | None = None) -> list[BaseTool]:
    """The tools plugins register for ``recipe`` and registered ``model``, selected by ``recipe.tools``.

    Without a recipe every registered tool is returned; with a model, its ``ask_<name>`` tool is added.
    """
    from .plugins import load_plugins, pm

    load_plugins()
    found: dict[str, BaseTool] = {}

    def register(tool: BaseTool) -> None:
        if not isinstance(tool, BaseTool):
            raise AgentpeftError(f"a plugin registered {tool!r} as a tool; register LangChain BaseTool objects")
        found.setdefault(tool.name, tool)

    pm.hook.register_tools(register=register, recipe=recipe, model=model)
    wanted = list(recipe.tools) if recipe is not None else list(found)
    unknown = [n for n in wanted if n not in found]
    if unknown:
        raise AgentpeftError(f"recipe {recipe.name!r} lists unknown tool(s) {', '.join(unknown)}; "
                             f"registered tools: {', '.join(sorted(found)) or 'none'}")
    tools = [found[n] for n in dict.fromkeys(wanted)]
    if model and ask_tool_name(model) in found and ask_tool_name(model) not in wanted:
        tools.append(found[ask_tool_name(model)])
    return tools
