"""The pluggy plugin manager: built-in plugins plus the ``agentpeft`` entry-point group."""

from __future__ import annotations

import importlib
import os
from importlib.metadata import entry_points

import pluggy

from . import hookspecs

DEFAULT_PLUGINS = (
    "agentpeft.default_plugins.recipes",
    "agentpeft.default_plugins.loaders",
    "agentpeft.default_plugins.medquad",
    "agentpeft.default_plugins.generators",
    "agentpeft.default_plugins.filters",
    "agentpeft.default_plugins.metrics",
    "agentpeft.default_plugins.tools",
    "agentpeft.default_plugins.medical",
    "agentpeft.default_plugins.tech_docs",
)

pm = pluggy.PluginManager("agentpeft")
pm.add_hookspecs(hookspecs)

#: Entry points that failed to load: ``{name: "error message"}``.
failed_plugins: dict[str, str] = {}
#: The distribution each third-party plugin came from: ``{name: "package version"}``.
plugin_packages: dict[str, str] = {}
#: Entry points not loaded because ``AGENTPEFT_DISABLE_PLUGINS`` names them (or is ``1``).
disabled_plugins: list[str] = []

_loaded = False


def _disabled() -> set[str] | bool:
    value = os.environ.get("AGENTPEFT_DISABLE_PLUGINS", "").strip()
    if value in ("", "0"):
        return set()
    if value in ("1", "all", "true"):
        return True
    return {name.strip() for name in value.split(",") if name.strip()}


def load_plugins() -> pluggy.PluginManager:
    """Register the built-in plugins, then third-party ones from entry points (once)."""
    global _loaded
    if _loaded:
        return pm
    _loaded = True
    for name in DEFAULT_PLUGINS:
        if not pm.has_plugin(name):
            pm.register(importlib.import_module(name), name)
    disabled = _disabled()
    for ep in entry_points(group="agentpeft"):
        if disabled is True or ep.name in disabled:
            disabled_plugins.append(ep.name)  # never imported: its code does not run
            continue
        if pm.has_plugin(ep.name):
            continue
        try:
            pm.register(ep.load(), ep.name)
            if ep.dist is not None:
                plugin_packages[ep.name] = f"{ep.dist.name} {ep.dist.version}"
        except Exception as exc:  # a broken plugin must never break the CLI
            failed_plugins[ep.name] = f"{type(exc).__name__}: {exc}"
    return pm


def plugin_fingerprint() -> list[str]:
    """Each loaded plugin as "name package": part of every cache key, so that a plugin change invalidates it."""
    return sorted(f"{p['name']} {p['package']}" for p in get_plugins())


def get_plugins() -> list[dict]:
    """Describe every registered plugin: name, hooks and distribution."""
    load_plugins()
    out = []
    for plugin in pm.get_plugins():
        name = pm.get_name(plugin)
        out.append(
            {
                "name": name,
                "hooks": sorted(h.name for h in pm.get_hookcallers(plugin) or []),
                "package": package_of(name),
            }
        )
    return out


def collect(hook_name: str) -> list:
    """Call a ``register_*`` hook and return everything the plugins registered."""
    load_plugins()
    items: list = []
    getattr(pm.hook, hook_name)(register=items.append)
    return items


def package_of(plugin_name: str) -> str:
    """The distribution a plugin came from: "agentpeft (built-in)", "dist version", or the plugin's name."""
    if plugin_name in plugin_packages:
        return plugin_packages[plugin_name]
    return "agentpeft (built-in)" if plugin_name in DEFAULT_PLUGINS else plugin_name


def collect_by_plugin(hook_name: str) -> list[tuple[str, object]]:
    """Like ``collect``, but each item comes with the name of the plugin that registered it."""
    load_plugins()
    items: list[tuple[str, object]] = []
    # pluggy calls the last-registered implementation first; keep that order.
    for impl in reversed(getattr(pm.hook, hook_name).get_hookimpls()):
        impl.function(register=lambda item, _name=impl.plugin_name: items.append((_name, item)))
    return items
