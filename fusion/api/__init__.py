"""The plugin contract: every type and helper a plugin (built-in or third-party) may use.

This package imports nothing else of fusion and does not import torch, so a plugin that
imports it loads fast. ``fusion`` re-exports all of it; the modules are:

- :mod:`~fusion.api.hookspecs`: the hooks (``@fusion.hookimpl``);
- :mod:`~fusion.api.strategy` and :mod:`~fusion.api.params`: merge strategies, their
  declared parameters and the :class:`TensorContext` they merge in;
- :mod:`~fusion.api.architecture`: architecture specs (tensor names → canonical names, roles);
- :mod:`~fusion.api.resolver`: what a model resolver gets, header-only folders for plans;
- :mod:`~fusion.api.modelfiles`: the files a model folder holds besides its weights;
- :mod:`~fusion.api.vocab`: vocabulary alignments and fusion functions of pairwise fusion;
- :mod:`~fusion.api.selection`: exact top-k selection (the rule every kernel follows);
- :mod:`~fusion.api.sparsify` and :mod:`~fusion.api.task_vectors`: the task-vector sparsifiers
  and the generalized task arithmetic (TIES, DARE, breadcrumbs, DELLA are settings of it);
- :mod:`~fusion.api.random`: seeded counter-based random numbers;
- :mod:`~fusion.api.vectors`: tensors as vectors (float64 Gram matrices, linear combinations);
- :mod:`~fusion.api.kernels`: the compiled building blocks of a strategy's C path;
- :mod:`~fusion.api.dtypes` and :mod:`~fusion.api.errors`.
"""

from .architecture import PARTS, ROLES, ArchitectureSpec, Rule, TensorRole, load_architecture_file, part_of
from .errors import CheckpointError, ConfigError, FusionError, MergeError
from .hookspecs import hookimpl
from .params import Param
from .resolver import ResolveOptions, expand_user, looks_like_hub_name, write_header_folder
from .strategy import Strategy, TensorContext
from .vocab import Alignment, FusionFunction, VocabContext, edit_distance, min_edit_distance_token, pivot_index

__all__ = [
    "PARTS", "ROLES", "Alignment", "ArchitectureSpec", "CheckpointError", "ConfigError", "FusionError",
    "FusionFunction", "MergeError", "Param", "ResolveOptions", "Rule", "Strategy", "TensorContext",
    "TensorRole", "VocabContext", "edit_distance", "expand_user", "hookimpl", "load_architecture_file",
    "looks_like_hub_name", "min_edit_distance_token", "part_of", "pivot_index", "write_header_folder",
]
