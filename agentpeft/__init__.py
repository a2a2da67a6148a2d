"""agentpeft: turn a knowledge base into a specialized, evaluated, fine-tuned LLM for LangChain agents.

The Python API has the CLI's verbs, and the plugin API what a plugin needs (``hookimpl`` and the
types its hooks register). Both are imported on first use, so ``import agentpeft`` stays light.
"""

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_API = {
    "build": "agentpeft.pipeline.build",
    "train": "agentpeft.pipeline.build:train_recipe",
    "make_dataset": "agentpeft.pipeline.dataset",
    "evaluate_model": "agentpeft.pipeline.evaluate",
    "pull_model": "agentpeft.models",
    "list_models": "agentpeft.registry",
    "show": "agentpeft.registry",
    "remove": "agentpeft.registry",
    "export": "agentpeft.registry",
    "get_recipe": "agentpeft.recipe",
    "get_recipes": "agentpeft.recipe",
    "write_report": "agentpeft.report",
    "load_llm": "agentpeft.langchain",
    "get_tools": "agentpeft.langchain",
    "create_agent": "agentpeft.langchain",
}

#: The plugin API: ``from agentpeft import hookimpl, Loader, Pair, ...`` (see docs/plugins.md).
PLUGIN_API = {
    "hookimpl": "agentpeft.hookspecs",
    "Recipe": "agentpeft.recipe",
    "Loader": "agentpeft.pipeline.ingest",
    "SkipFile": "agentpeft.pipeline.ingest",
    "Pair": "agentpeft.pairs",
    "Generator": "agentpeft.pairs",
    "Filter": "agentpeft.pairs",
    "key_fact": "agentpeft.pairs",
    "note": "agentpeft.pairs",
    "Metric": "agentpeft.pipeline.evaluate",
    "AgentpeftError": "agentpeft.errors",
}
_API.update(PLUGIN_API)
__all__ = ["__version__", "plan", *_API]

if TYPE_CHECKING:  # what the lazy names are, for type checkers and editors
    from .errors import AgentpeftError
    from .hookspecs import hookimpl
    from .pairs import Filter, Generator, Pair, key_fact, note
    from .pipeline.evaluate import Metric
    from .pipeline.ingest import Loader, SkipFile
    from .recipe import Recipe

# Bound eagerly (the module is light): importing the submodule agentpeft.plan later would otherwise
# shadow the lazily looked-up verb with the module object.
from .plan import plan  # noqa: E402


def __getattr__(name: str):
    if name in _API:
        module, _, attr = _API[name].partition(":")
        return getattr(import_module(module), attr or name)
    raise AttributeError(f"module 'agentpeft' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
