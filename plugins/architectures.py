"""Registers the declarative architecture specs shipped in ``registry/`` (``fusion.registry``)."""

from __future__ import annotations

from importlib import resources

import fusion


@fusion.hookimpl
def register_architectures(register) -> None:
    for entry in sorted(resources.files("fusion.registry").iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            with resources.as_file(entry) as path:
                register(fusion.load_architecture_file(path))
