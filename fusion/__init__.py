"""fusion: merge and fuse language and vision-language models.

The public plugin API lives here: ``@fusion.hookimpl``, :class:`Strategy` and :class:`Param`
for merge strategies, :class:`ArchitectureSpec` for architectures, :class:`ResolveOptions` for
resolvers (with :func:`write_header_folder` for planning models that are not downloaded),
:class:`Alignment` and :class:`FusionFunction` for pairwise fusion. Importing fusion does not
import torch.
"""

from .architecture import ArchitectureSpec, Rule, TensorRole, load_architecture_file
from .checkpoint import write_header_folder
from .errors import CheckpointError, ConfigError, FusionError, MergeError
from .fuse.api import Alignment, FusionFunction, VocabContext
from .hookspecs import hookimpl
from .resolve import ResolveOptions
from .strategy import Param, Strategy

__version__ = "0.1.0"

__all__ = [
    "Alignment", "ArchitectureSpec", "CheckpointError", "ConfigError", "FusionError", "FusionFunction",
    "MergeError", "Param", "ResolveOptions", "Rule", "Strategy", "TensorRole", "VocabContext", "hookimpl",
    "load_architecture_file", "write_header_folder", "__version__",
]
