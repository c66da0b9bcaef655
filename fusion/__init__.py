"""fusion: merge and fuse language and vision-language models.

The plugin contract (:mod:`fusion.api`) is re-exported here: ``@fusion.hookimpl``,
:class:`Strategy` and :class:`Param` for merge strategies, :class:`ArchitectureSpec` for
architectures, :class:`ResolveOptions` for resolvers, :class:`Alignment` and
:class:`FusionFunction` for pairwise fusion. Importing fusion does not import torch.
"""

from .api import *  # noqa: F403
from .api import __all__ as _api

__version__ = "0.1.0"

__all__ = [*_api, "__version__"]
