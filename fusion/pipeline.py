"""The merge pipeline and its Python API: config → resolve → open → plan → stream → write.

The CLI, the demo and ``fusion fuse``'s merge stage all merge through :func:`merge`; a notebook
does too::

    import fusion

    summary = fusion.merge({
        "merge_method": "ties",
        "base_model": "./base",
        "models": [{"model": "./chat", "parameters": {"weight": 0.7, "density": 0.5}},
                   {"model": "./code", "parameters": {"weight": 0.3, "density": 0.5}}],
    }, "merged")
    print(summary.text())
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Union

from .api.dtypes import DTYPES
from .api.modelfiles import support_files
from .api.resolver import ResolveOptions
from .config import MergeConfig, load_config
from .planner import Plan, build_plan
from .stream import Summary, execute, select_kernel
from .vocabulary import write_tokenizer
from .writer import atomic_folder, check_output, output_folder, parse_size, refuse_existing, write_config

#: What the API takes as a config: a YAML file, data shaped like one, or a parsed config.
ConfigLike = Union[str, Path, Mapping[str, Any], MergeConfig]


def load(config: ConfigLike, *, base_dir: str | Path | None = None, check: bool = True) -> MergeConfig:
    """A :class:`~fusion.config.MergeConfig` from a YAML file's path, a mapping shaped like the
    file, or a MergeConfig (returned as it is). Relative model paths are taken from the file's
    folder, else from ``base_dir`` (default: the current folder). Raises the config's problems,
    all at once, unless ``check=False`` (then they wait in ``config.problems``)."""
    if isinstance(config, MergeConfig):
        return config.raise_problems() if check else config
    if isinstance(config, Mapping):
        return MergeConfig.from_mapping(config, base_dir=base_dir, check=check)
    if isinstance(config, (str, Path)):
        return load_config(config, check=check)
    raise TypeError(f"a merge config is a path, a mapping or a MergeConfig, not {type(config).__name__}")


def plan(config: ConfigLike, *, offline: bool = False, cache_dir: str | None = None, weights: bool = False,
         random_seed: int | None = None, base_dir: str | Path | None = None) -> Plan:
    """Open the models ``config`` names and plan the merge (``fusion plan``), reading headers only.

    ``weights=False`` lets Hub models that are not in the cache be planned from their remote
    headers, downloading no weights. The plan holds the models' files open: use it in a ``with``
    block or call :meth:`Plan.close`; ``plan.render()`` is the text ``fusion plan`` prints,
    ``plan.describe()`` its data.
    """
    # the planner reports the config's own problems together with the strategy's
    merge_config = load(config, base_dir=base_dir, check=False)
    options = ResolveOptions(base_dir=merge_config.base_dir, offline=offline, cache_dir=cache_dir,
                             weights=weights)
    return build_plan(merge_config, options, random_seed=random_seed)


def merge(config: ConfigLike, output: str | Path, *, force: bool = False, kernel: str = "auto",
          threads: int | None = None, shard_size: int | str = "5GB", card: bool = True,
          offline: bool = False, cache_dir: str | None = None, random_seed: int | None = None,
          progress: bool = False, base_dir: str | Path | None = None) -> Summary:
    """Merge the models ``config`` names into the model folder ``output`` (``fusion merge``).

    The folder is written atomically: nothing appears at ``output`` unless the merge completes,
    and an existing non-empty ``output`` is replaced only with ``force``. ``kernel`` is ``auto``,
    ``c`` or ``torch``; ``shard_size`` a size such as ``"5GB"``. Returns the :class:`Summary`
    (``summary.text()`` is what the CLI prints).
    """
    size = parse_size(shard_size)
    refuse_existing(output_folder(output), force)  # before anything is downloaded
    with plan(config, offline=offline, cache_dir=cache_dir, weights=True, random_seed=random_seed,
              base_dir=base_dir) as p:
        return write(p, output, force=force, kernel=kernel, threads=threads, shard_size=size, card=card,
                     progress=progress)


def write(plan: Plan, output: str | Path, *, force: bool = False, kernel: str = "auto",
          threads: int | None = None, shard_size: int = 5 * 10**9, card: bool = True,
          progress: bool = False) -> Summary:
    """Execute a plan into ``output`` atomically: a failed run leaves nothing behind."""
    from .card import model_card, provenance

    output = output_folder(output)
    protected = [("config file", plan.config.source)] if plan.config.source else []
    check_output(output, [(m.label, m.folder) for m in plan.inputs], protected)
    preflight(plan, kernel)  # fail before creating anything
    notes: list[str] = []
    with atomic_folder(output, force, notes) as tmp:
        summary = execute(plan, tmp, shard_size=shard_size, kernel=kernel, threads=threads, progress=progress)
        out_dtype = DTYPES[plan.config.output_dtype].name if plan.config.output_dtype else None
        write_config(tmp, plan.output_config, out_dtype)
        write_tokenizer(plan, tmp)
        (tmp / "fusion.json").write_text(json.dumps(provenance(plan), indent=2) + "\n")
        if card:
            (tmp / "README.md").write_text(model_card(plan, plan.resolve_options.resolved))
    summary.output = output
    summary.notices += notes
    return summary


def preflight(plan: Plan, kernel: str = "auto") -> None:
    """What the real run would refuse before merging anything (``merge --dry-run`` asks too):
    kernels that cannot be had, files of the layout model that lead outside its folder."""
    select_kernel(plan, kernel)
    if plan.layout.checkpoint.format != "headers":
        support_files(plan.layout.folder, plan.layout.label)
