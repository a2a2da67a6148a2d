"""The hooks a plugin implements. Built-in features use the same hooks."""

from pluggy import HookimplMarker, HookspecMarker

hookspec = HookspecMarker("agentpeft")
hookimpl = HookimplMarker("agentpeft")


@hookspec
def register_recipes(register):
    """Register recipes: call register(path_to_recipe_file_or_Recipe)."""


@hookspec
def register_loaders(register):
    """Register knowledge-base loaders: call register(Loader)."""


@hookspec
def register_generators(register):
    """Register instruction-pair generators: call register(Generator)."""


@hookspec
def register_filters(register):
    """Register instruction-pair filters: call register(Filter)."""


@hookspec
def register_metrics(register):
    """Register evaluation metrics: call register(Metric)."""


@hookspec
def register_tools(register, recipe, model):
    """Register LangChain tools for a recipe (or None) and registered model ref (or None): call register(BaseTool)."""


@hookspec
def register_commands(cli):
    """Register extra CLI commands on the click group."""
