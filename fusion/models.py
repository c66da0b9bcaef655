"""Opening the models of a merge: resolve each reference, open its checkpoint lazily, recognise
its architecture, and index its tensors by canonical name."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .api.architecture import ArchitectureSpec, ExactNames, TensorRole
from .api.errors import CheckpointError
from .api.resolver import ResolveOptions
from .checkpoint import Checkpoint, TensorInfo, open_checkpoint
from .host import architectures
from .resolve import ResolvedModel, resolve


@dataclass
class Model:
    """One opened input model with its architecture and canonical-name index."""

    source: ResolvedModel
    checkpoint: Checkpoint
    spec: ArchitectureSpec
    roles: dict[str, TensorRole] = field(default_factory=dict)
    by_canonical: dict[str, str] = field(default_factory=dict)
    #: the language model's layers, over which gradient parameters are spread
    num_layers: int = 1

    @property
    def reference(self) -> str:
        return self.source.reference

    @property
    def label(self) -> str:
        return self.source.label

    @property
    def folder(self) -> Path:
        return self.source.folder

    def lookup(self, canonical: str) -> TensorInfo | None:
        name = self.by_canonical.get(canonical)
        if name is None and canonical == self.spec.tied_pair[0]:
            name = self.by_canonical.get(self.spec.tied_pair[1])  # tied: the head is the embedding
        return self.checkpoint.tensors[name] if name is not None else None


def detect(config: dict[str, Any]) -> ArchitectureSpec | None:
    """The registered architecture that recognises a config.json best (None: none does)."""
    best, best_score = None, 0
    for spec in architectures():  # later registrations win ties: a plugin can override a built-in
        score = spec.match_score(config)
        if score and score >= best_score:
            best, best_score = spec, score
    return best


class ModelSet:
    """The models of one merge, each opened once however many config entries name it."""

    def __init__(self, options: ResolveOptions):
        self.options = options
        self.notices: list[str] = []
        self._open: dict[Path, Model] = {}

    def open(self, reference: str, where: str) -> Model:
        source = resolve(reference, self.options, where)
        key = source.folder.resolve()
        if key in self._open:
            return self._open[key]
        ckpt = open_checkpoint(source.folder, source.label)
        spec = detect(ckpt.config)
        model = Model(source, ckpt, spec or ExactNames())
        if spec is None:
            arch = ckpt.config.get("architectures") or ckpt.config.get("model_type") or "unknown"
            self.notices.append(f"{source.label}: architecture {arch} is not registered, so its tensors are "
                                f"matched by exact name (`fusion architectures` lists the known ones)")
        for name in ckpt.tensors:
            role = model.spec.classify(name) or TensorRole(canonical=name, role="other")
            model.roles[name] = role
            model.by_canonical.setdefault(role.canonical, name)
        model.num_layers = self._num_layers(model)
        self._open[key] = model
        return model

    def _num_layers(self, model: Model) -> int:
        """config.json's layer count, checked against the layers the tensors have: a wrong count
        would put every layer at the wrong point of a gradient."""
        spec, config = model.spec, model.checkpoint.config
        key = spec.num_layers_key
        declared = spec.setting(config, key)
        indices = [r.layer for r in model.roles.values() if r.role == "layer" and r.layer is not None]
        found = 1 + max(indices) if indices else None
        if declared is None:
            return found or 1
        where = f"{model.label}: config.json has {key} = {declared!r}"
        fix = f"fix {key} in {model.checkpoint.folder / 'config.json'}"
        if type(declared) is not int or declared < 1:
            raise CheckpointError(f"{where}, which is not a positive whole number; {fix}")
        if found is not None and declared != found:
            detail = f"{where}, but its tensors have {found} layers (layers.0 to layers.{found - 1})"
            if isinstance(spec, ExactNames):  # names matched by guesswork: a vision tower may count
                self.notices.append(f"{detail}; gradients are spread over {declared} layers")
                return declared
            raise CheckpointError(f"{detail}; {fix}")
        return declared
