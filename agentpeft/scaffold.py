"""``agentpeft recipes new``: scaffold a separately installable recipe plugin package that builds as it comes."""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
import unicodedata
from pathlib import Path
from string import Template

from .errors import AgentpeftError

# Matched with fullmatch: "$" would also match before a trailing newline. Character ranges are ASCII.
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")

PYPROJECT = Template('''\
[build-system]
requires = ["hatchling>=1.21"]
build-backend = "hatchling.build"

[project]
name = "$dist"
version = "0.1.0"
description = "An agentpeft recipe plugin: the $name recipe and its knowledge base."
readme = "README.md"
requires-python = ">=3.10"
dependencies = ["agentpeft"]

[project.optional-dependencies]
test = ["pytest>=8"]

# agentpeft finds the plugin through this entry point once the package is installed.
[project.entry-points.agentpeft]
$name = "$module"

[tool.hatch.build.targets.wheel]
packages = ["$module"]

[tool.pytest.ini_options]
pythonpath = ["."]
''')

MODULE = Template('''\
"""The $name recipe, registered with agentpeft through the ``agentpeft`` entry point."""

from pathlib import Path

from agentpeft import hookimpl

RECIPE = Path(__file__).parent / "recipe.yaml"


@hookimpl
def register_recipes(register) -> None:
    """Register the $name recipe file."""
    register(RECIPE)
''')

RECIPE = Template('''\
# $name: the recipe (validated on load; `agentpeft recipes show $name` prints it resolved).
name: $name
description: Assistant that answers questions about $title from its knowledge base.
system_prompt: You are the $title assistant. Answer briefly and exactly.
base_model: smollm2-135m
knowledge_base: kb          # relative to this file

data:
  loaders: [markdown]
  generators: [faq, facts]   # add general to train general Q/A as plain chats against forgetting
  train_phrasings: 4

train:
  method: qlora
  r: 16
  alpha: 32
  epochs: 6
  lr: 2.0e-3
  batch_size: 8
  max_seq_len: 256

eval:
  metrics: [accuracy, rouge_l]
  primary: accuracy
  max_new_tokens: 48
''')

FAQ = Template('''\
# $title FAQ

Replace these sample sections with your own: every `## Question?` heading becomes a training pair,
and its **bold** span is the key fact that the evaluation looks for in the model's answer.

## When is the $title help desk open?

The $title help desk is open **$days**, from 9:00 to 17:00.

## How do I reach the $title help desk?

Post in the **#$slug-help** channel; someone from the team answers within one working day.

## Where are $title documents kept?

All $title documents live in the **$word Library** on the shared drive.

## How do I request access to $title systems?

Fill in the **$code access form**; your team lead approves it within two working days.
''')

FACTS = Template('''\
# $title at a glance

Bullets of the form `- **Attribute:** value` under a heading become questions about that heading.

## $title team

- **Team lead:** $person
- **Home office:** $city
- **Founding year:** $year
- **Team size:** $size people
''')

README = Template('''\
# $dist

An [agentpeft](https://pypi.org/project/agentpeft/) recipe plugin: the `$name` recipe
(`$module/recipe.yaml`) and its knowledge base (`$module/kb/`).

```bash
pip install -e .            # registers the plugin through its `agentpeft` entry point
agentpeft recipes           # lists $name with this package as its source
agentpeft build $name       # ingest -> dataset -> train -> evaluate -> merge -> register
pip install -e '.[test]' && python -m pytest   # the tests build the recipe on a tiny offline model
```

Edit the knowledge base (`## Question?` sections with a **bold** key fact, `- **Attribute:** value`
bullets) and the recipe, run the tests, then publish like any Python package
(`python -m build && twine upload dist/*`).
''')

TEST = Template('''\
"""The $name recipe is registered, valid, and builds end to end on a tiny offline model."""

from pathlib import Path

import agentpeft
from agentpeft import Recipe
from agentpeft.testing import make_tiny_base

import $module as plugin


def test_recipe_is_registered_and_valid():
    registered = []
    plugin.register_recipes(registered.append)
    recipe = Recipe.from_file(registered[0])
    assert recipe.name == "$name"
    assert recipe.kb_path.is_dir()
    assert recipe.eval.primary in recipe.eval.metrics


def test_recipe_builds_on_a_tiny_model(tmp_path, monkeypatch):
    monkeypatch.setenv("AGENTPEFT_HOME", str(tmp_path / "home"))
    kb = Path(plugin.RECIPE).parent / "kb"
    base = make_tiny_base(tmp_path / "base", [p.read_text(encoding="utf-8") for p in kb.rglob("*.md")])
    result = agentpeft.build(str(plugin.RECIPE), base=str(base), max_steps=2, allow_regression=True,
                             show_progress=False, log=lambda line: None)
    assert result.version == 1
    assert (result.path / "manifest.json").is_file()
    assert result.eval.primary == "accuracy"
''')


def _title(name: str) -> str:
    """``acme-hr`` -> ``Acme HR``: short words without vowels read as acronyms."""
    words = re.split(r"[-_.]+", name)
    return " ".join(w.upper() if len(w) <= 3 and not re.search(r"[aeiouy]", w) else w.capitalize()
                    for w in words if w)


def _fields(name: str) -> dict[str, str]:
    digest = int(hashlib.sha256(name.encode()).hexdigest(), 16)

    def pick(options: list[str], shift: int) -> str:
        return options[(digest >> shift) % len(options)]

    title = _title(name)
    module = "agentpeft_" + re.sub(r"[^a-z0-9]", "_", name)
    initials = "".join(w[0] for w in re.split(r"[-_.]+", name) if w).upper()
    return {
        "name": name, "title": title, "module": module, "dist": f"agentpeft-{name}",
        "slug": re.sub(r"[^a-z0-9]+", "-", name),
        "days": pick(["Monday to Friday", "Monday to Thursday", "Tuesday to Saturday"], 0),
        "word": pick(["Amber", "Juniper", "Cobalt", "Saffron", "Granite", "Willow"], 4),
        "code": f"{initials}-{10 + digest % 90}",
        "person": pick(["Mara Quillfeather", "Tobias Renwick", "Ines Halloway", "Dev Amberley"], 12),
        "city": pick(["Lisbon", "Tallinn", "Porto", "Utrecht", "Ghent", "Bergen"], 16),
        "year": str(2005 + (digest >> 20) % 19),
        "size": str(6 + (digest >> 28) % 50),
    }


def _check_name(name: str) -> None:
    """Refuse a recipe name that cannot also name its package folder and the model it builds (registry rules:
    at most 64 characters, no '..', no trailing '.', no Windows device name), suggesting one that can."""
    from .registry import _RESERVED

    if (isinstance(name, str) and _NAME.fullmatch(name) and len(name) <= 64 and ".." not in name
            and not name.endswith(".") and name.split(".")[0] not in _RESERVED):
        return
    text = name if isinstance(name, str) else ""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()  # "Näme" -> "name"
    fixed = re.sub(r"\.{2,}", ".", re.sub(r"[^a-z0-9._-]+", "-", ascii_text))[:64].strip("-._")
    if not fixed or fixed.split(".")[0] in _RESERVED:
        fixed = f"{fixed or 'acme'}-hr"
    shown = text[:80] + "..." if len(text) > 80 else name
    raise AgentpeftError(f"recipe name {shown!r} must be lower-case letters, digits, '.', '_' or '-', starting with "
                         "a letter or digit, at most 64 characters, not ending in '.' nor a Windows device name "
                         f"(con, nul, ...); try `agentpeft recipes new {fixed}`")


def scaffold(name: str, directory: str | Path = ".") -> Path:
    """Write a recipe plugin package for ``name`` into ``directory/name``; returns its folder.

    The package holds a pyproject with the ``agentpeft`` entry point, a module registering the
    recipe, the recipe file, a small sample knowledge base and a test that builds it on a tiny model.
    """
    from .recipe import get_recipes

    _check_name(name)
    if name in get_recipes():
        raise AgentpeftError(f"a recipe named {name!r} is already registered; pick another name")
    parent = Path(directory)
    target = parent / name
    if target.exists():
        raise AgentpeftError(f"{target} already exists; pick another name or --dir")
    parent.mkdir(parents=True, exist_ok=True)
    f = _fields(name)
    files = {
        "pyproject.toml": PYPROJECT, "README.md": README, f"{f['module']}/__init__.py": MODULE,
        f"{f['module']}/recipe.yaml": RECIPE, f"{f['module']}/kb/faq.md": FAQ,
        f"{f['module']}/kb/facts.md": FACTS, "tests/test_recipe.py": TEST,
    }
    # Written aside, then renamed into place: a failure leaves nothing half-written.
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=parent))
    try:
        for rel, template in files.items():
            path = staging / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(template.substitute(f), encoding="utf-8")
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
