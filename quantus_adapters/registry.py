"""Discovery of explanation methods through pluggy.

Every method that :func:`quantus_adapters.explain` can run comes from a plugin: a module (or
any object) with a hook implementation ``splitxai_explainers()`` that returns a dictionary
``{method name: explainer}``. Plugins are found through the entry-point group ``"splitxai"``;
splitxai's own adapters (``captum_split.plugin``, ``zennit_split.plugin``) and the baselines
(``quantus_adapters.baselines``) register that way too, exactly like a third-party package::

    # pyproject.toml of a third-party package
    [project.entry-points.splitxai]
    mymethods = "mypackage.splitxai_plugin"

    # mypackage/splitxai_plugin.py
    import pluggy

    hookimpl = pluggy.HookimplMarker("splitxai")

    @hookimpl
    def splitxai_explainers():
        return {"MyMethod": my_method}

An explainer is called as ``fn(model, inputs, targets, **options)`` with ``inputs`` a float
tensor (B, C, H, W) on the model's device and ``targets`` a long tensor (B,); it returns a
tensor (B, 1, h, w) (a layer map, any resolution) or (B, C, H, W) (input resolution). The
first line of its docstring is the description shown by :func:`available_methods`.

A plugin that fails to import is reported with a :class:`PluginLoadWarning` and skipped (its
methods are then missing, and an unknown-method error says why). Two plugins offering the same
method name is a clash: it is never resolved silently, using that name raises
:class:`MethodClashError` naming both plugins.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import sys
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pluggy

__all__ = [
    "ENTRY_POINT_GROUP",
    "PROJECT_NAME",
    "MethodClashError",
    "PluginError",
    "PluginLoadWarning",
    "UnknownMethodError",
    "available_methods",
    "get_explainer",
    "get_plugin_manager",
    "hookimpl",
    "hookspec",
    "method_info",
    "plugin_errors",
    "refresh",
    "register",
]

PROJECT_NAME = "splitxai"
ENTRY_POINT_GROUP = "splitxai"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def splitxai_explainers() -> dict[str, Callable[..., Any]]:
    """Return the explanation methods that this plugin offers.

    Returns
    -------
    dict of str to callable
        ``{method name: explainer}``; an explainer is called as
        ``fn(model, inputs, targets, **options)`` and returns a tensor (B, 1, h, w) or
        (B, C, H, W). The first line of its docstring is its one-line description.
    """


class PluginError(RuntimeError):
    """A plugin is broken or two plugins disagree."""


class MethodClashError(PluginError):
    """Two plugins offer a method of the same name."""


class UnknownMethodError(ValueError):
    """No installed plugin offers the requested method."""


class PluginLoadWarning(UserWarning):
    """A plugin could not be loaded; its methods are unavailable."""


@dataclass(frozen=True)
class MethodInfo:
    """One method offered by one plugin.

    Attributes
    ----------
    name: str
        The method name.
    function: callable
        The explainer.
    plugin: str
        The plugin name (the entry-point name, or the name given to :func:`register`).
    distribution: str
        The distribution that declared the entry point (``"name version"``), or
        ``"registered at run time"``.
    """

    name: str
    function: Callable[..., Any]
    plugin: str
    distribution: str

    @property
    def description(self) -> str:
        """The first non-empty line of the explainer's docstring."""
        doc = inspect.getdoc(self.function) or ""
        for line in doc.splitlines():
            if line.strip():
                return line.strip()
        return "(no description)"

    def origin(self) -> str:
        """Say where the method comes from, for error messages."""
        return f"plugin {self.plugin!r} ({self.distribution})"


@dataclass
class _Table:
    manager: pluggy.PluginManager
    methods: dict[str, MethodInfo] = field(default_factory=dict)
    clashes: dict[str, list[MethodInfo]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    load_errors: dict[str, str] = field(default_factory=dict)
    origins: dict[int, str] = field(default_factory=dict)


_lock = threading.RLock()
_table: _Table | None = None


def _new_manager() -> tuple[pluggy.PluginManager, dict[str, str], dict[int, str]]:
    """Create the plugin manager and load the entry points of group ``"splitxai"``.

    Entry points that fail to import are blocked (and reported) before pluggy's
    ``load_setuptools_entrypoints`` runs, so that one broken plugin does not hide the others.
    Two distributions declaring the same entry-point name for different modules (pluggy would
    keep the first one silently) are registered both, the second under ``"name@dist"``, so
    that a method clash between them is reported.
    """
    manager = pluggy.PluginManager(PROJECT_NAME)
    manager.add_hookspecs(sys.modules[__name__])
    errors: dict[str, str] = {}
    first: dict[str, tuple[str, str]] = {}  # entry-point name -> (value, dist label)
    extra: list[tuple[str, importlib.metadata.EntryPoint, importlib.metadata.Distribution]] = []
    origins: dict[int, str] = {}
    seen: set[int] = set()  # ids of the plugin objects loaded so far
    for dist in list(importlib.metadata.distributions()):
        for ep in dist.entry_points:
            if ep.group != ENTRY_POINT_GROUP:
                continue
            label = _dist_label(dist)
            if ep.name in first:
                if first[ep.name][0] != ep.value:
                    extra.append((f"{ep.name}@{label}", ep, dist))
                continue
            first[ep.name] = (ep.value, label)
            try:
                plugin = ep.load()
                if id(plugin) in seen:  # the same module under a second name: an alias
                    manager.set_blocked(ep.name)
                    continue
                _validate(plugin)
                seen.add(id(plugin))
            except Exception as exc:  # any import-time or validation failure of a plugin
                errors[ep.name] = f"{ep.value} ({label}): {type(exc).__name__}: {exc}"
                manager.set_blocked(ep.name)
    manager.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    for name, ep, dist in extra:
        try:
            plugin = ep.load()
            _validate(plugin)
        except Exception as exc:
            errors[name] = f"{ep.value} ({_dist_label(dist)}): {type(exc).__name__}: {exc}"
            continue
        if manager.is_registered(plugin):
            continue
        manager.register(plugin, name=name)
        origins[id(plugin)] = _dist_label(dist)
    origins.update(
        {id(plugin): _dist_label(dist) for plugin, dist in manager.list_plugin_distinfo()}
    )
    return manager, errors, origins


def _validate(plugin: object) -> None:
    """Register ``plugin`` with a scratch manager: pluggy checks its hook implementations."""
    scratch = pluggy.PluginManager(PROJECT_NAME)
    scratch.add_hookspecs(sys.modules[__name__])
    scratch.register(plugin)
    scratch.check_pending()  # a hookimpl for a hook that does not exist (a typo)


def _dist_label(dist: Any) -> str:
    try:
        return f"{dist.metadata['Name']} {dist.version}"
    except Exception:  # a distribution with broken metadata
        return "unknown distribution"


def _collect(
    manager: pluggy.PluginManager, errors: dict[str, str], origins: dict[int, str]
) -> _Table:
    """Call every plugin's hook separately, so that each method keeps its origin."""
    table = _Table(manager=manager, errors=dict(errors), load_errors=dict(errors),
                   origins=origins)
    offered: dict[str, list[MethodInfo]] = {}
    implementers = {impl.plugin_name for impl in manager.hook.splitxai_explainers.get_hookimpls()}
    for name, plugin in manager.list_name_plugin():
        if plugin is not None and name not in implementers and name not in table.errors:
            table.errors[name] = "it implements no splitxai_explainers() hook"
    for impl in manager.hook.splitxai_explainers.get_hookimpls():
        plugin = impl.plugin_name
        dist = origins.get(id(impl.plugin), "registered at run time")
        try:
            result = impl.function()
        except Exception as exc:
            table.errors[plugin] = f"splitxai_explainers() raised {type(exc).__name__}: {exc}"
            continue
        if not isinstance(result, dict):
            table.errors[plugin] = (
                f"splitxai_explainers() returned {type(result).__name__}, expected a dict "
                "{method name: callable}"
            )
            continue
        for name, fn in result.items():
            if not isinstance(name, str) or not callable(fn):
                table.errors[plugin] = (
                    f"splitxai_explainers() returned the entry {name!r}: {fn!r}; "
                    "names must be str and values callables"
                )
                continue
            offered.setdefault(name, []).append(MethodInfo(name, fn, plugin, dist))
    for name, infos in offered.items():
        if len(infos) == 1:
            table.methods[name] = infos[0]
        else:
            table.clashes[name] = infos
    for plugin, message in table.errors.items():
        warnings.warn(
            f"splitxai plugin {plugin!r} could not be loaded, its methods are unavailable: "
            f"{message}",
            PluginLoadWarning,
            stacklevel=4,
        )
    return table


def _get_table() -> _Table:
    global _table
    with _lock:
        if _table is None:
            _table = _collect(*_new_manager())
        return _table


def refresh() -> pluggy.PluginManager:
    """Re-create the plugin manager and reload every entry point of group ``"splitxai"``.

    Call this after installing a plugin in a running interpreter (or after changing
    ``sys.path``). Plugins added with :func:`register` are dropped.

    Returns
    -------
    pluggy.PluginManager
        The new plugin manager.
    """
    global _table
    with _lock:
        importlib.invalidate_caches()
        _table = None
        return _get_table().manager


def get_plugin_manager() -> pluggy.PluginManager:
    """Return the plugin manager (created and loaded on first use).

    Returns
    -------
    pluggy.PluginManager
        The manager of project ``"splitxai"``.
    """
    return _get_table().manager


def register(plugin: object, name: str | None = None) -> str:
    """Register a plugin object at run time, without an installed distribution.

    Parameters
    ----------
    plugin: object
        A module, class or instance with a ``splitxai_explainers`` hook implementation
        (decorated with :data:`hookimpl`).
    name: str, optional
        The plugin name; pluggy's default (derived from the object) when None.

    Returns
    -------
    str
        The name under which the plugin was registered.
    """
    global _table
    with _lock:
        table = _get_table()
        registered = table.manager.register(plugin, name=name)
        if registered is None:
            raise PluginError(f"plugin {name or plugin!r} is blocked and was not registered")
        _table = _collect(table.manager, table.load_errors, table.origins)
        return registered


def plugin_errors() -> dict[str, str]:
    """Return the plugins that could not be loaded, with the reason.

    Returns
    -------
    dict of str to str
        ``{plugin name: reason}``.
    """
    return dict(_get_table().errors)


def _clash_message(name: str, infos: list[MethodInfo]) -> str:
    origins = " and ".join(info.origin() for info in infos)
    return (
        f"method {name!r} is offered by more than one plugin: {origins}. splitxai does not "
        "pick one; uninstall or block one of them "
        "(quantus_adapters.get_plugin_manager().set_blocked(name), then refresh())."
    )


def available_methods() -> dict[str, str]:
    """List the methods that the installed plugins offer.

    Returns
    -------
    dict of str to str
        ``{method name: one-line description}``, sorted by name. A name offered by two
        plugins is listed with a description that names both (using it raises
        :class:`MethodClashError`).
    """
    table = _get_table()
    out = {name: info.description for name, info in table.methods.items()}
    for name, infos in table.clashes.items():
        out[name] = "CLASH: " + _clash_message(name, infos)
    return dict(sorted(out.items()))


def method_info(name: str) -> MethodInfo:
    """Return the explainer and origin of one method.

    Parameters
    ----------
    name: str
        The method name, as listed by :func:`available_methods`.

    Returns
    -------
    MethodInfo
        The explainer, its plugin and distribution.

    Raises
    ------
    MethodClashError
        Two plugins offer ``name``.
    UnknownMethodError
        No plugin offers ``name``; the message lists the available methods and the plugins
        that failed to load.
    """
    table = _get_table()
    if name in table.clashes:
        raise MethodClashError(_clash_message(name, table.clashes[name]))
    if name in table.methods:
        return table.methods[name]
    names = sorted([*table.methods, *table.clashes])
    message = f"unknown method {name!r}; available methods: {', '.join(names) or '(none)'}."
    close = [n for n in names if n.lower() == str(name).lower()]
    if close:
        message += f" Did you mean {close[0]!r}?"
    if table.errors:
        failed = "; ".join(f"{k}: {v}" for k, v in sorted(table.errors.items()))
        message += f" Plugins that failed to load: {failed}"
    raise UnknownMethodError(message)


def get_explainer(name: str) -> Callable[..., Any]:
    """Return the explainer callable of one method (see :func:`method_info`)."""
    return method_info(name).function
