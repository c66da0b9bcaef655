"""The plugin manager: built-ins, installed plugins (entry-point group ``fusion``) and local ones.

Registrations are collected plugin by plugin, so a plugin that fails to import or whose hook
raises is reported by ``fusion plugins`` and the others keep working.
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
from .api.vocab import Alignment, FusionFunction
from .api.strategy import Strategy

ENTRY_POINT_GROUP = "fusion"
#: The built-in plugins, loaded first and in this order.
BUILTINS = (
    "fusion.plugins.local",
    "fusion.plugins.hub",
    "fusion.plugins.architectures",
    "fusion.plugins.linear",
    "fusion.plugins.task_arithmetic",
    "fusion.plugins.ties",
    "fusion.plugins.sce",
    "fusion.plugins.varm",
    "fusion.plugins.alignments",
    "fusion.plugins.fusion_functions",
)


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

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class _Host:
    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("fusion")
        self.pm.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        self._strategies: dict[str, Strategy] | None = None
        self._architectures: list[ArchitectureSpec] | None = None
        self._named: dict[str, dict[str, Any]] = {}

    def add(self, module: Any, info: PluginInfo) -> None:
        if info.name in self.infos:  # e.g. a local file named like a built-in: keep both
            info.name = f"{info.distribution or info.origin}:{info.name}"
        try:
            self.pm.register(module, name=info.name)
        except Exception as exc:  # a malformed hookimpl: report it, keep the rest
            info.error = f"{type(exc).__name__}: {exc}"
        else:
            info.hooks = sorted(
                c.name for c in (self.pm.get_hookcallers(module) or ()) if c.spec is not None
            )
        self.infos[info.name] = info
        self._strategies = self._architectures = None
        self._named = {}

    def fail(self, info: PluginInfo, exc: BaseException) -> None:
        info.error = f"{type(exc).__name__}: {exc}"
        if info.name in self.infos:
            info.name = f"{info.distribution or info.origin}:{info.name}"
        self.infos[info.name] = info

    def collect(self) -> None:
        """Call the registration hooks, which fills in what each plugin registered."""
        self.strategies, self.architectures  # noqa: B018  (the properties collect once)
        self.named("register_alignments", Alignment, "alignments", "alignment")
        self.named("register_fusion_functions", FusionFunction, "fusion_functions", "fusion function")

    def _collect(self, hook: str, kind: type, attr: str) -> list[tuple[str, Any]]:
        found: list[tuple[str, Any]] = []
        # get_hookimpls() is in registration order: built-ins first, then installed, then local
        for impl in getattr(self.pm.hook, hook).get_hookimpls():
            info = self.infos[impl.plugin_name]
            batch: list[Any] = []
            try:
                impl.function(register=batch.append)
                for obj in batch:
                    if not isinstance(obj, kind):
                        raise TypeError(f"{hook} registered {obj!r}, which is not a fusion.{kind.__name__}")
                    if not getattr(obj, "name", ""):
                        raise TypeError(f"{hook} registered a {kind.__name__} without a name")
            except Exception as exc:
                info.error = f"{type(exc).__name__}: {exc}"
                continue
            for obj in batch:
                getattr(info, attr).append(obj.name)
                found.append((impl.plugin_name, obj))
        return found

    @property
    def strategies(self) -> dict[str, Strategy]:
        if self._strategies is None:
            out: dict[str, Strategy] = {}
            for plugin, s in self._collect("register_strategies", Strategy, "strategies"):
                if s.name in out:
                    self.infos[plugin].error = (
                        f"strategy {s.name!r} is already registered by another plugin; this one is ignored"
                    )
                    continue
                out[s.name] = s
            self._strategies = out
        return self._strategies

    def named(self, hook: str, kind: type, attr: str, what: str) -> dict[str, Any]:
        """Objects registered by ``hook``, by name; the first registration of a name wins."""
        if hook not in self._named:
            out: dict[str, Any] = {}
            for plugin, obj in self._collect(hook, kind, attr):
                if obj.name in out:
                    self.infos[plugin].error = (
                        f"{what} {obj.name!r} is already registered by another plugin; this one is ignored"
                    )
                    continue
                out[obj.name] = obj
            self._named[hook] = out
        return self._named[hook]

    @property
    def architectures(self) -> list[ArchitectureSpec]:
        if self._architectures is None:
            self._architectures = [a for _, a in self._collect("register_architectures", ArchitectureSpec, "architectures")]
        return self._architectures


_host: _Host | None = None
_local_plugins: list[str] = []


def _load_builtins(host: _Host) -> None:
    from . import __version__

    for modname in BUILTINS:
        info = PluginInfo(name=modname.rsplit(".", 1)[-1], distribution="fusion", version=__version__)
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
        host.add(module, info)
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
    h.collect()
    return list(h.infos.values())


def strategies() -> dict[str, Strategy]:
    return host().strategies


def architectures() -> list[ArchitectureSpec]:
    return host().architectures


def alignments() -> dict[str, Alignment]:
    return host().named("register_alignments", Alignment, "alignments", "alignment")


def fusion_functions() -> dict[str, FusionFunction]:
    return host().named("register_fusion_functions", FusionFunction, "fusion_functions", "fusion function")


def get_strategy(name: Any, path: str = "merge_method", line: int | None = None) -> Strategy:
    known = strategies()
    if not isinstance(name, str) or name not in known:
        raise ConfigError(
            path,
            f"unknown merge method {name!r}; known methods: {', '.join(sorted(known))} "
            f"(`fusion plugins` lists them with their parameters)",
            line,
        )
    return known[name]
