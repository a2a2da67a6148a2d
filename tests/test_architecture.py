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
