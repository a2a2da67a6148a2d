"""The built-in recipes, registered through the same hook a third-party package uses."""

from __future__ import annotations

from pathlib import Path

from ..hookspecs import hookimpl


def builtin_recipes_dir() -> Path:
    """Where the built-in recipes live: inside the wheel, or at the top of a source checkout."""
    packaged = Path(__file__).resolve().parents[1] / "_recipes"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "recipes"


@hookimpl
def register_recipes(register):
    for recipe_file in sorted(builtin_recipes_dir().glob("*/recipe.yaml")):
        register(recipe_file)
