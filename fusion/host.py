"""The plugin host: built-ins, installed plugins (entry-point group ``fusion``) and local ones
(``--plugin``), and what they register.

Plugins load in a fixed order: the built-ins (in :data:`BUILTINS` order), then installed plugins,
then ``--plugin`` modules in command-line order. One rule settles every kind of registration
(strategies, architectures, alignments, fusion functions): **when two plugins register the same
name, the one loaded later wins**, so an installed plugin can replace a built-in. The command that
uses such a name says which plugin's it uses (:func:`clash`), and ``fusion plugins`` marks the
shadowed ones. Registrations are collected plugin by plugin: a plugin that fails to import or
whose hook raises is reported by ``fusion plugins`` and the others keep working.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import pluggy

from .api import hookspecs
from .api.architecture import ArchitectureSpec
from .api.errors import ConfigError, FusionError
from .api.strategy import Strategy
from .api.vocab import Alignment, FusionFunction

ENTRY_POINT_GROUP = "fusion"
#: The distribution fusion itself is installed as.
DISTRIBUTION = "model-fusion"
#: The built-in plugins, loaded first and in this order.
BUILTINS = (
    "fusion.plugins.local",
    "fusion.plugins.hub",
    "fusion.plugins.architectures",
    "fusion.plugins.linear",
    "fusion.plugins.task_arithmetic",
    "fusion.plugins.ties",
    "fusion.plugins.dare",
    "fusion.plugins.breadcrumbs",
    "fusion.plugins.della",
    "fusion.plugins.sce",
    "fusion.plugins.varm",
    "fusion.plugins.slerp",
    "fusion.plugins.sphere_means",
    "fusion.plugins.model_stock",
    "fusion.plugins.nearswap",
    "fusion.plugins.arcee_fusion",
    "fusion.plugins.ram",
    "fusion.plugins.passthrough",
    "fusion.plugins.alignments",
    "fusion.plugins.fusion_functions",
)


@dataclass(frozen=True)
class Kind:
    """One kind of registration: its hook, the class registered objects must be, the name users see."""

    hook: str
    cls: type
    what: str
    attr: str  # the PluginInfo list that names what each plugin registered


KINDS = {k.what: k for k in (
    Kind("register_strategies", Strategy, "strategy", "strategies"),
    Kind("register_architectures", ArchitectureSpec, "architecture", "architectures"),
    Kind("register_alignments", Alignment, "alignment", "alignments"),
    Kind("register_fusion_functions", FusionFunction, "fusion function", "fusion_functions"),
)}


@dataclass
class PluginInfo:
    name: str
    distribution: str | None = None
    version: str | None = None
    origin: str = "builtin"  # builtin | installed | local
    error: str | None = None
    hooks: list[str] = field(default_factory=list)
    strategies: list[str] = field(default_factory=list)
    architectures: list[str] = field(default_factory=list)
    alignments: list[str] = field(default_factory=list)
    fusion_functions: list[str] = field(default_factory=list)
    #: "strategy ties (by example)": names this plugin registered that a later plugin replaced
    shadowed: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @property
    def title(self) -> str:
        return f"{self.name} ({self.distribution or self.origin})"


class _Host:
    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("fusion")
        self.pm.add_hookspecs(hookspecs)
        self.hook_names = frozenset(c.name for c in self.pm.hook.__dict__.values()
                                    if isinstance(c, pluggy.HookCaller) and c.spec is not None)
        self.infos: dict[str, PluginInfo] = {}
        # kind → name → [(plugin, object)] in load order; the last entry is the one in use
        self._registry: dict[str, dict[str, list[tuple[str, Any]]]] = {}

    def add(self, module: Any, info: PluginInfo) -> None:
        self._name(info)
        try:
            self.pm.register(module, name=info.name)
        except Exception as exc:  # a malformed hookimpl: report it, keep the rest
            info.error = f"{type(exc).__name__}: {exc}"
        else:
            info.hooks = sorted(
                c.name for c in (self.pm.get_hookcallers(module) or ()) if c.spec is not None
            )
        self.infos[info.name] = info
        self._registry = {}

    def fail(self, info: PluginInfo, exc: BaseException) -> None:
        info.error = f"{type(exc).__name__}: {exc}"
        self._name(info)
        self.infos[info.name] = info

    def _name(self, info: PluginInfo) -> None:
        if info.name in self.infos:  # e.g. a local file named like a built-in: keep both
            info.name = f"{info.distribution or info.origin}:{info.name}"

    def registered(self, what: str) -> dict[str, list[tuple[str, Any]]]:
        """Every registration of one kind, by name, in load order (collected once)."""
        if what not in self._registry:
            kind = KINDS[what]
            found: dict[str, list[tuple[str, Any]]] = {}
            # get_hookimpls() is in registration order: built-ins, then installed, then local
            for impl in getattr(self.pm.hook, kind.hook).get_hookimpls():
                info = self.infos[impl.plugin_name]
                batch: list[Any] = []
                try:
                    impl.function(register=batch.append)
                    for obj in batch:
                        if not isinstance(obj, kind.cls):
                            raise TypeError(f"{kind.hook} registered {obj!r}, which is not a "
                                            f"fusion.{kind.cls.__name__}")
                        if not getattr(obj, "name", ""):
                            raise TypeError(f"{kind.hook} registered a {kind.cls.__name__} without a name")
                except Exception as exc:
                    info.error = f"{type(exc).__name__}: {exc}"
                    if info.origin == "local":  # asked for with --plugin: its failure is the user's to fix
                        raise FusionError(f"--plugin {info.name}: its {kind.hook} hook raised {info.error}; "
                                          f"fix the plugin or leave out --plugin") from None
                    continue
                for obj in batch:
                    getattr(info, kind.attr).append(obj.name)
                    found.setdefault(obj.name, []).append((impl.plugin_name, obj))
            for name, entries in found.items():
                for plugin, _ in entries[:-1]:
                    self.infos[plugin].shadowed.append(f"{what} {name} (by {entries[-1][0]})")
            self._registry[what] = found
        return self._registry[what]

    def active(self, what: str) -> dict[str, Any]:
        """The object in use for each name of one kind: the last registration."""
        return {name: entries[-1][1] for name, entries in self.registered(what).items()}


_host: _Host | None = None
_local_plugins: list[str] = []


def _load_builtins(host: _Host) -> None:
    from .version import __version__

    for modname in BUILTINS:
        info = PluginInfo(name=modname.rsplit(".", 1)[-1], distribution=DISTRIBUTION, version=__version__)
        try:
            host.add(importlib.import_module(modname), info)
        except Exception as exc:
            host.fail(info, exc)


def _load_entry_points(host: _Host) -> None:
    wanted = os.environ.get("FUSION_LOAD_PLUGINS")
    allowed = None if wanted is None else {w.strip() for w in wanted.split(",") if w.strip()}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        dist_name = dist.name if dist is not None else None
        if allowed is not None and ep.name not in allowed and dist_name not in allowed:
            continue
        info = PluginInfo(name=ep.name, distribution=dist_name,
                          version=dist.version if dist is not None else None, origin="installed")
        try:
            host.add(ep.load(), info)
        except Exception as exc:
            host.fail(info, exc)


def _import_local(spec: str) -> Any:
    path = Path(spec)
    if spec.endswith(".py") or path.is_file():
        if not path.is_file():
            raise FusionError(f"--plugin {spec}: no such file; give a Python file or an importable module name.")
        modname = f"fusion_local_plugin_{path.stem}"
        mod_spec = importlib.util.spec_from_file_location(modname, path)
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[modname] = module
        mod_spec.loader.exec_module(module)
        return module
    return importlib.import_module(spec)


def _build() -> _Host:
    host = _Host()
    _load_builtins(host)
    _load_entry_points(host)
    for spec in _local_plugins:
        info = PluginInfo(name=Path(spec).stem if spec.endswith(".py") else spec, origin="local",
                          distribution=None, version=None)
        try:
            module = _import_local(spec)
        except FusionError:
            raise
        except Exception as exc:  # asked for by name: a failure is the user's to fix, not to skip
            raise FusionError(f"--plugin {spec} failed to load ({type(exc).__name__}: {exc}); "
                              f"fix the plugin or leave out --plugin") from None
        if host.pm.is_registered(module):  # a built-in or installed plugin: it is loaded already
            continue
        host.add(module, info)
        # pluggy keeps a function named like no hook as a hook of its own, which nothing calls
        unknown = sorted(c.name for c in host.pm.get_hookcallers(module) or () if c.spec is None)
        if info.error or unknown:
            why = info.error or (f"{', '.join(unknown)} is not a fusion hook; the hooks are "
                                 f"{', '.join(sorted(host.hook_names))}")
            raise FusionError(f"--plugin {spec} cannot be used ({why}); fix the plugin or leave out --plugin")
    return host


def host() -> _Host:
    global _host
    if _host is None:
        _host = _build()
    return _host


def add_local_plugin(spec: str) -> None:
    """Load a plugin from a module name or a ``.py`` file (the CLI's ``--plugin``)."""
    _local_plugins.append(spec)
    reset()


def reset() -> None:
    """Forget loaded plugins (tests; after ``--plugin``)."""
    global _host
    _host = None


def get_plugin_manager() -> pluggy.PluginManager:
    return host().pm


def plugin_infos() -> list[PluginInfo]:
    h = host()
    for what in KINDS:
        h.registered(what)
    return list(h.infos.values())


def strategies() -> dict[str, Strategy]:
    return host().active("strategy")


def parameter_owners() -> dict[str, str]:
    """Every parameter name a strategy in use declares → a strategy that declares it, so that a
    parameter given to the wrong method can be told from a typo."""
    return {p.name: s.name for s in strategies().values() for p in s.parameters}


def architectures() -> list[ArchitectureSpec]:
    """The architecture specs in use, in load order (a later spec of the same name replaces an
    earlier one; among specs that recognise a checkpoint equally well, the later one wins)."""
    registered = host().registered("architecture")
    return sorted((entries[-1][1] for entries in registered.values()),
                  key=lambda spec: _load_position(registered[spec.name][-1][0]))


def _load_position(plugin: str) -> int:
    return list(host().infos).index(plugin)


def alignments() -> dict[str, Alignment]:
    return host().active("alignment")


def fusion_functions() -> dict[str, FusionFunction]:
    return host().active("fusion function")


def registered_by(what: str, name: str) -> PluginInfo | None:
    """The plugin whose registration of ``name`` is in use."""
    entries = host().registered(what).get(name)
    return host().infos[entries[-1][0]] if entries else None


def clash(what: str, name: str) -> str | None:
    """One line saying which plugin's ``name`` is used, when more than one registered it."""
    entries = host().registered(what).get(name, [])
    if len(entries) < 2:
        return None
    infos = host().infos
    others = ", ".join(infos[p].title for p, _ in entries[:-1])
    return (f"{what} {name!r} is registered by {others} and {infos[entries[-1][0]].title}; the last one "
            f"loaded is used (`fusion plugins` lists them; FUSION_LOAD_PLUGINS chooses which load)")


def get_strategy(name: Any, path: str = "merge_method", line: int | None = None) -> Strategy:
    known = strategies()
    if not isinstance(name, str) or name not in known:
        failed = [i for i in host().infos.values() if i.error]
        hint = f"; plugin {failed[0].title} failed to load ({failed[0].error.splitlines()[0]})" if failed else ""
        raise ConfigError(
            path,
            f"unknown merge method {name!r}; known methods: {', '.join(sorted(known))} "
            f"(`fusion plugins` lists them with their parameters){hint}",
            line,
        )
    return known[name]
