"""Registers the declarative architecture specs shipped in ``fusion/registry/``."""

from __future__ import annotations

from pathlib import Path

import fusion

REGISTRY = Path(__file__).resolve().parent.parent / "registry"


@fusion.hookimpl
def register_architectures(register) -> None:
    for path in sorted(REGISTRY.glob("*.yaml")):
        register(fusion.load_architecture_file(path))
