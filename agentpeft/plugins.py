"""The pluggy plugin manager: built-in plugins plus the ``agentpeft`` entry-point group.

A third-party plugin cannot break the commands: an entry point whose import raises (``SystemExit``
included) is not registered, and each hook of a registered plugin runs in isolation, so one that
raises is recorded in ``failed_plugins`` and skipped while every other plugin's hooks still run.
"""

from __future__ import annotations

import functools
import importlib
import logging
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

log = logging.getLogger(__name__)

#: Plugins that failed to load or whose hooks raised: ``{name: "error message"}``.
failed_plugins: dict[str, str] = {}
#: The hooks each plugin failed in: ``{plugin name: {hook name: "error"}}``.
hook_failures: dict[str, dict[str, str]] = {}
#: The distribution each third-party plugin came from: ``{name: "package version"}``.
plugin_packages: dict[str, str] = {}
#: Entry points not loaded because ``AGENTPEFT_DISABLE_PLUGINS`` names them (or is ``1``).
disabled_plugins: list[str] = []

_loaded = False


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _record_hook_failure(plugin_name: str, hook_name: str, exc: BaseException) -> None:
    """Note that a plugin's hook raised: listed by ``agentpeft plugins``, warned about once per hook."""
    hooks = hook_failures.setdefault(plugin_name, {})
    first = hook_name not in hooks
    hooks[hook_name] = _one_line(exc)
    failed_plugins[plugin_name] = "; ".join(f"{hook} raised {error}" for hook, error in hooks.items())
    if first:
        log.warning("plugin %r failed in %s (%s) and was skipped there; `agentpeft plugins` lists it, "
                    "AGENTPEFT_DISABLE_PLUGINS=%s turns it off", plugin_name, hook_name, hooks[hook_name],
                    plugin_name)


def _isolated(plugin_name: str, hook_name: str, function, argnames: tuple[str, ...]):
    """``function`` (one plugin's hook implementation) with whatever it raises recorded, not raised.

    What it passes to ``register`` is held back until it returns, so a hook that fails halfway
    registers nothing rather than part of its items.
    """

    @functools.wraps(function)
    def call(*args, **kwargs):
        bound = {**dict(zip(argnames, args)), **kwargs}
        register = bound.get("register")
        held: list = []
        if register is not None:
            bound["register"] = held.append
        try:
            result = function(**bound)
            for item in held:
                register(item)
            return result
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # SystemExit too: one plugin must not end every command
            _record_hook_failure(plugin_name, hook_name, exc)
            return None

    return call


class PluginManager(pluggy.PluginManager):
    """A pluggy manager that isolates the hooks of every plugin but the built-in ones (see ``_isolated``)."""

    def register(self, plugin: object, name: str | None = None) -> str | None:
        name = super().register(plugin, name)
        if name is None or name in DEFAULT_PLUGINS:
            return name
        for caller in self.get_hookcallers(plugin) or []:
            for impl in caller.get_hookimpls():
                # Wrappers are generators around the other implementations: left as they are.
                if impl.plugin is plugin and not (impl.wrapper or impl.hookwrapper):
                    impl.function = _isolated(name, caller.name, impl.function, tuple(impl.argnames))
        return name


def new_plugin_manager() -> PluginManager:
    """An empty plugin manager with agentpeft's hook specifications."""
    manager = PluginManager("agentpeft")
    manager.add_hookspecs(hookspecs)
    return manager


pm = new_plugin_manager()


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
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # a broken plugin must never break the CLI, even one calling sys.exit
            failed_plugins[ep.name] = _one_line(exc)
    return pm


def plugin_fingerprint() -> list[str]:
    """Each loaded plugin as "name package": part of every cache key, so that a plugin change invalidates it."""
    return sorted(f"{p['name']} {p['package']}" for p in get_plugins())


#: Hooks that only register things, with the arguments besides ``register`` to call them with.
_PROBED = {"register_recipes": {}, "register_loaders": {}, "register_generators": {}, "register_filters": {},
           "register_metrics": {}, "register_tools": {"recipe": None, "model": None}}


def _probe() -> None:
    """Call each third-party plugin's registering hooks once, discarding what they register, so that
    one failing in a hook no command has called yet is recorded in ``failed_plugins``."""
    for plugin in pm.get_plugins():
        name = pm.get_name(plugin)
        if name in DEFAULT_PLUGINS:
            continue
        for caller in pm.get_hookcallers(plugin) or []:
            if caller.name not in _PROBED:
                continue
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin and not (impl.wrapper or impl.hookwrapper):
                    given = {"register": lambda item: None, **_PROBED[caller.name]}
                    try:  # already isolated when registered through PluginManager; this covers any other
                        impl.function(**{arg: given.get(arg) for arg in impl.argnames})
                    except KeyboardInterrupt:
                        raise
                    except BaseException as exc:
                        _record_hook_failure(name, caller.name, exc)


def get_plugins() -> list[dict]:
    """Describe every registered plugin: name, hooks and distribution.

    Third-party plugins' registering hooks are called once first, so that ``failed_plugins`` also
    lists a plugin whose hook raises.
    """
    load_plugins()
    _probe()
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
