"""The hr-policy recipe: Larkspur Logistics' HR-policy assistant, registered through the ``agentpeft`` entry point."""

from pathlib import Path

from agentpeft import hookimpl

RECIPE = Path(__file__).parent / "recipe.yaml"


@hookimpl
def register_recipes(register) -> None:
    """Register the hr-policy recipe file."""
    register(RECIPE)
