"""Model references → local folders, through the ``resolve_model`` hook."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .api.errors import FusionError
from .api.resolver import ResolveOptions, expand_user, looks_like_hub_name


@dataclass(frozen=True)
class ResolvedModel:
    """A model a config names, resolved: where the config names it (``models[1]``, ``pivot``),
    the reference as written, and the local folder it resolved to."""

    where: str
    reference: str
    folder: Path

    @property
    def label(self) -> str:
        """How messages and the plan name the model: ``models[1] (./ft)``."""
        return f"{self.where} ({self.reference})"


def resolve(reference: str, options: ResolveOptions, where: str) -> ResolvedModel:
    """Resolve ``reference`` with the registered resolvers or raise one clear sentence."""
    from .host import get_plugin_manager

    try:
        result = get_plugin_manager().hook.resolve_model(reference=reference, options=options)
    except FusionError as exc:  # say which config entry named the model
        raise FusionError(f"{where}: {exc}") from None
    if result is None:
        local = options.base_dir / expand_user(reference, "model path")
        if not looks_like_hub_name(reference):
            raise FusionError(
                f"{where}: model path {str(local)!r} does not exist; check the path "
                f"(relative paths are taken from the config file's folder)."
            )
        raise FusionError(
            f"{where}: {reference!r} is not a local folder and no resolver could fetch it; "
            f"install a resolver plugin or give a local path."
        )
    return ResolvedModel(where, reference, Path(result))
