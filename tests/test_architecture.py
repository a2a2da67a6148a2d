"""The package's shape: the plugin API is importable from ``agentpeft``, ``import agentpeft`` stays light."""

from __future__ import annotations

import subprocess
import sys

import agentpeft


def test_the_plugin_api_is_importable_from_the_package():
    from agentpeft import Filter, Generator, Loader, Metric, Pair, Recipe, SkipFile, hookimpl  # noqa: F401

    for name, module in agentpeft.PLUGIN_API.items():
        assert getattr(agentpeft, name) is getattr(sys.modules[module], name), name
        assert name in agentpeft.__all__ and name in dir(agentpeft)


def test_import_agentpeft_stays_light():
    code = ("import sys, agentpeft; heavy = [m for m in ('torch', 'transformers', 'langchain_core', 'pydantic') "
            "if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"import agentpeft imported {out}"


# --- the import graph ------------------------------------------------------------------------------

import ast  # noqa: E402
from pathlib import Path  # noqa: E402

PACKAGE = Path(agentpeft.__file__).parent
#: What the pipeline stages must not import: the use layer and the front ends built on it.
USE_LAYER = ("agentpeft.langchain", "agentpeft.chat", "agentpeft.serve", "agentpeft.cli")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at module level or inside functions and classes, except under
    ``if TYPE_CHECKING:`` (never run)."""
    found = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    """``{module: the agentpeft modules it imports}``, each import resolved to the module it loads."""
    modules = _modules()

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                # "from pkg import mod" loads pkg.mod; "from mod import name" loads mod.
                candidates = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in modules else origin for a in node.names]
            targets.update(t for t in map(known, candidates) if t and t.startswith("agentpeft") and t != name)
        graph[name] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    cycles = []
    for component in components:  # a concrete path round the component, for the failure message
        members, start = set(component), min(component)
        path, seen = [start], {start}
        while True:
            nxt = sorted(w for w in graph[path[-1]] if w in members)
            back = start in nxt
            if back and len(path) > 1:
                break
            step = next((w for w in nxt if w not in seen), start)
            if step == start:
                break
            path.append(step)
            seen.add(step)
        cycles.append(path + [start])
    return cycles


def test_the_import_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "agentpeft.tools" in graph["agentpeft.pipeline.build"]  # imported inside build()
    assert "agentpeft.pipeline.dataset" in graph["agentpeft.cli"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_cycles():
    cycles = _cycles(import_graph())
    assert not cycles, "import cycles (move what both sides need into a lower module): " + "; ".join(
        " -> ".join(c) for c in cycles)


def test_the_pipeline_does_not_import_the_use_layer():
    bad = [f"{module} imports {target}" for module, targets in sorted(import_graph().items())
           if module.startswith("agentpeft.pipeline") for target in sorted(targets)
           if any(target == u or target.startswith(u + ".") for u in USE_LAYER)]
    assert not bad, ("the pipeline stages sit below the use layer (agentpeft.langchain, chat, serve, cli); "
                     "import the shared piece from a lower module (agentpeft.chat_models, agentpeft.tools): "
                     + "; ".join(bad))
