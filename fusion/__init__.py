"""fusion: merge and fuse language and vision-language models.

The plugin contract (:mod:`fusion.api`) is re-exported here: ``@fusion.hookimpl``,
:class:`Strategy` and :class:`Param` for merge strategies, :class:`ArchitectureSpec` for
architectures, :class:`ResolveOptions` for resolvers, :class:`Alignment` and
:class:`FusionFunction` for pairwise fusion. Beside it, the Python API of a merge:
:func:`merge`, :func:`plan` and :func:`load` (see :mod:`fusion.pipeline`), loaded on first use.
Importing fusion does not import torch.
"""

from typing import Any

from .api import *  # noqa: F403
from .api import __all__ as _api

from .version import __version__

#: the Python API, imported on first use so that importing fusion (as every plugin does) stays light
_PIPELINE = ("merge", "plan", "load")
_TYPES = {"MergeConfig": "config", "Plan": "planner", "Summary": "stream"}

__all__ = [*_api, *_PIPELINE, *_TYPES, "__version__"]


def __getattr__(name: str) -> Any:
    import importlib

    if name in _PIPELINE:
        return getattr(importlib.import_module(".pipeline", __name__), name)
    if name in _TYPES:
        return getattr(importlib.import_module(f".{_TYPES[name]}", __name__), name)
    raise AttributeError(f"module 'fusion' has no attribute {name!r}")
