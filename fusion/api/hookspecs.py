"""The plugin hooks. Each hook is part of the public contract and is documented in docs/plugins.md."""

from __future__ import annotations

from typing import Any, Callable

import pluggy

hookspec = pluggy.HookspecMarker("fusion")
hookimpl = pluggy.HookimplMarker("fusion")


@hookspec
def register_strategies(register: Callable[[Any], None]) -> None:
    """Call ``register(strategy)`` for each merge strategy (a :class:`fusion.Strategy` instance)."""


@hookspec
def register_architectures(register: Callable[[Any], None]) -> None:
    """Call ``register(spec)`` for each architecture (a :class:`fusion.ArchitectureSpec`)."""


@hookspec(firstresult=True)
def resolve_model(reference: str, options: Any) -> str | None:
    """Turn a model reference into a local folder, or return None to let the next resolver try.

    ``options`` is a :class:`fusion.ResolveOptions` (offline, cache_dir, revision handling).
    Resolvers registered later are asked first; the built-in local-path resolver is asked before
    any download so that an existing local path always wins.
    """


@hookspec
def register_alignments(register: Callable[[Any], None]) -> None:
    """Call ``register(alignment)`` for each vocabulary alignment of pairwise fusion
    (a :class:`fusion.Alignment`)."""


@hookspec
def register_fusion_functions(register: Callable[[Any], None]) -> None:
    """Call ``register(function)`` for each fusion function of pairwise fusion
    (a :class:`fusion.FusionFunction`)."""
