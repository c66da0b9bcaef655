"""Model references → local folders, through the ``resolve_model`` hook."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import FusionError


@dataclass
class ResolveOptions:
    """What resolvers get besides the reference.

    ``base_dir`` is the folder relative paths are taken from (the config file's folder).
    ``offline`` forbids network access; ``cache_dir`` overrides the download cache;
    ``resolved`` is filled by resolvers with what they pinned (reference → commit) so the output
    can record it. ``weights`` is false when only tensor names, dtypes and shapes are needed
    (``fusion plan``, ``merge --dry-run``): a resolver may then return a header-only folder
    (:func:`fusion.write_header_folder`) instead of downloading the weights.
    """

    base_dir: Path = field(default_factory=Path.cwd)
    offline: bool = False
    cache_dir: str | None = None
    weights: bool = True
    resolved: dict = field(default_factory=dict)


_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?\Z")


def looks_like_hub_name(reference: str) -> bool:
    """``org/name`` or ``org/name@revision``; anything else is a filesystem path."""
    return bool(_HUB_NAME.match(reference))


def resolve(reference: str, options: ResolveOptions, where: str) -> Path:
    """Resolve ``reference`` with the registered resolvers or raise one clear sentence."""
    from .plugins import get_plugin_manager

    try:
        result = get_plugin_manager().hook.resolve_model(reference=reference, options=options)
    except FusionError as exc:  # say which config entry named the model
        raise FusionError(f"{where}: {exc}") from None
    if result is None:
        local = (options.base_dir / Path(reference).expanduser())
        if not looks_like_hub_name(reference):
            raise FusionError(
                f"{where}: model path {str(local)!r} does not exist; check the path "
                f"(relative paths are taken from the config file's folder)."
            )
        raise FusionError(
            f"{where}: {reference!r} is not a local folder and no resolver could fetch it; "
            f"install a resolver plugin or give a local path."
        )
    return Path(result)
