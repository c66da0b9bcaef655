"""Architecture specs: how a checkpoint's tensor names map to canonical backbone names and roles.

A spec recognises a checkpoint from its config.json (``architectures`` first, then
``model_type``) and classifies each tensor name with ordered rules. A rule's pattern is the
tensor name with two placeholders: ``{layer}`` (a layer index) and ``{*}`` (the rest of the
name). Tensors of different models line up when their canonical names are equal, which is what
lets a vision-language model's language backbone merge with a text model of its family.
Built-in specs are data files in ``registry/``; an exotic architecture subclasses
:class:`ArchitectureSpec` in a plugin.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import FusionError

#: Roles a tensor can play. Vision tower and projector are carried from the layout model unless a
#: config asks to merge them; everything else is merged by default.
ROLES = ("embedding", "layer", "final_norm", "lm_head", "vision_tower", "projector", "other")
CARRIED_BY_DEFAULT = frozenset({"vision_tower", "projector"})
#: The parts of a model, as a config's ``merge_parts`` names them; ``other`` (tensors no rule
#: names) is not a part and follows the spec's default.
PARTS = ("language_model", "vision_tower", "projector")
#: How messages name the parts (and tensors outside them).
PART_NAMES = {"language_model": "language model", "vision_tower": "vision tower",
              "projector": "projector", "other": "other tensors"}


def part_of(role: str) -> str:
    """The part a role belongs to: the language model, the vision tower, the projector, or other."""
    if role in ("vision_tower", "projector", "other"):
        return role
    return "language_model"


@dataclass(frozen=True)
class TensorRole:
    """What one tensor is: its canonical (layout-independent) name, role and layer index."""

    canonical: str
    role: str
    layer: int | None = None
    merge: bool = True


@dataclass(frozen=True)
class Rule:
    pattern: str
    canonical: str
    role: str
    merge: bool | None = None

    def compile(self) -> re.Pattern:
        out = ""
        for piece in re.split(r"(\{layer\}|\{\*\})", self.pattern):
            if piece == "{layer}":
                out += r"(?P<layer>\d+)"
            elif piece == "{*}":
                out += r"(?P<rest>.+)"
            else:
                out += re.escape(piece)
        return re.compile(out + r"\Z")


@dataclass
class ArchitectureSpec:
    """A declarative architecture adapter (see the module docstring)."""

    name: str
    architectures: tuple[str, ...] = ()
    model_types: tuple[str, ...] = ()
    rules: tuple[Rule, ...] = ()
    description: str = ""
    #: config key holding the language model's config in multimodal configs (e.g. text_config)
    text_config: str | None = None
    num_layers_key: str = "num_hidden_layers"
    #: canonical names of the output head and the embedding that stands in for it when a
    #: checkpoint has no head of its own (tied embeddings)
    tied_pair: tuple[str, str] = ("lm_head.weight", "embed_tokens.weight")
    source: str = ""
    _compiled: list = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.architectures = tuple(self.architectures)
        self.model_types = tuple(self.model_types)
        self.rules = tuple(self.rules)
        for r in self.rules:
            if r.role not in ROLES:
                raise FusionError(
                    f"architecture {self.name!r}{self._where()}: unknown role {r.role!r} in rule "
                    f"{r.pattern!r}; use one of {', '.join(ROLES)}."
                )
        self._compiled = [(r.compile(), r) for r in self.rules]

    def _where(self) -> str:
        return f" ({self.source})" if self.source else ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "") -> "ArchitectureSpec":
        known = {"name", "description", "architectures", "model_types", "tensors", "text_config",
                 "num_layers_key", "tied_pair"}
        unknown = set(data) - known
        where = f" in {source}" if source else ""
        if unknown or "name" not in data or "tensors" not in data:
            problem = (f"unknown keys {sorted(unknown)}" if unknown else "'name' and 'tensors' are required")
            raise FusionError(f"invalid architecture spec{where}: {problem}; allowed keys: {sorted(known)}.")
        rules = []
        for i, t in enumerate(data["tensors"]):
            try:
                rules.append(Rule(pattern=t["pattern"], canonical=t.get("canonical", t["pattern"]),
                                  role=t["role"], merge=t.get("merge")))
            except (KeyError, TypeError):
                raise FusionError(
                    f"invalid architecture spec{where}: tensors[{i}] needs 'pattern' and 'role'."
                ) from None
        return cls(
            name=data["name"],
            description=data.get("description", ""),
            architectures=tuple(data.get("architectures", ())),
            model_types=tuple(data.get("model_types", ())),
            rules=tuple(rules),
            text_config=data.get("text_config"),
            num_layers_key=data.get("num_layers_key", "num_hidden_layers"),
            tied_pair=tuple(data.get("tied_pair", ("lm_head.weight", "embed_tokens.weight"))),
            source=source,
        )

    # -- recognition -------------------------------------------------------------------------
    def match_score(self, config: Mapping[str, Any]) -> int:
        """2 when config.json's ``architectures`` names this spec, 1 for its ``model_type``."""
        if set(config.get("architectures") or ()) & set(self.architectures):
            return 2
        if config.get("model_type") in self.model_types:
            return 1
        return 0

    def text_config_of(self, config: Mapping[str, Any]) -> Mapping[str, Any]:
        if self.text_config and isinstance(config.get(self.text_config), Mapping):
            return config[self.text_config]
        return config

    def setting(self, config: Mapping[str, Any], key: str, default: Any = None) -> Any:
        """A language-model setting: the nested text config wins, then the top level."""
        text = self.text_config_of(config)
        if key in text:
            return text[key]
        return config.get(key, default)

    def num_layers(self, config: Mapping[str, Any]) -> int | None:
        value = self.setting(config, self.num_layers_key)
        return int(value) if isinstance(value, int) else None

    # -- names -------------------------------------------------------------------------------
    def classify(self, name: str) -> TensorRole | None:
        """The tensor's canonical name and role, or None when no rule matches."""
        for regex, rule in self._compiled:
            m = regex.match(name)
            if not m:
                continue
            groups = m.groupdict()
            canonical = rule.canonical
            layer = None
            if groups.get("layer") is not None:
                layer = int(groups["layer"])
                canonical = canonical.replace("{layer}", groups["layer"])
            if groups.get("rest") is not None:
                canonical = canonical.replace("{*}", groups["rest"])
            merge = rule.merge if rule.merge is not None else rule.role not in CARRIED_BY_DEFAULT
            return TensorRole(canonical=canonical, role=rule.role, layer=layer, merge=merge)
        return None

    def relayer(self, name: str, layer: int) -> str | None:
        """``name`` with its layer index replaced by ``layer``: the same tensor in another layer
        (e.g. of a layer-stacked output); None for a tensor outside the layers."""
        for regex, _ in self._compiled:
            m = regex.match(name)
            if m:
                if m.groupdict().get("layer") is None:
                    return None
                start, end = m.span("layer")
                return f"{name[:start]}{layer}{name[end:]}"
        return None

    def describe(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "architectures": list(self.architectures),
            "model_types": list(self.model_types),
            "source": self.source,
        }


class ExactNames(ArchitectureSpec):
    """Fallback for unrecognised checkpoints: tensors line up only by identical names."""

    _LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")

    def __init__(self) -> None:
        super().__init__(name="exact-names", description="unknown architecture: match tensor names exactly")

    def classify(self, name: str) -> TensorRole:
        m = self._LAYER.search(name)
        return TensorRole(canonical=name, role="layer" if m else "other",
                          layer=int(m.group(1)) if m else None)

    def relayer(self, name: str, layer: int) -> str | None:
        m = self._LAYER.search(name)
        return f"{name[:m.start(1)]}{layer}{name[m.end(1):]}" if m else None


def load_architecture_file(path: str | Path) -> ArchitectureSpec:
    """Read a declarative architecture spec (YAML) such as those in ``registry/``."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise FusionError(f"cannot read architecture spec {path}: {exc}") from None
    if not isinstance(data, Mapping):
        raise FusionError(f"architecture spec {path} must be a mapping with 'name' and 'tensors'.")
    return ArchitectureSpec.from_dict(data, source=str(path))
