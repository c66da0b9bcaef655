"""Resolve model references that are local folders. Asked first, so a local path always wins."""

from __future__ import annotations

from pathlib import Path

import fusion


@fusion.hookimpl(tryfirst=True)
def resolve_model(reference: str, options: fusion.ResolveOptions) -> str | None:
    path = fusion.expand_user(reference, "model path")
    if not path.is_absolute():
        path = Path(options.base_dir) / path
    return str(path.resolve()) if path.exists() else None
