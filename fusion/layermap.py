"""The output's layers: which input layers of which models each one is merged from.

A ``models:`` config is one output slice whose sources are the whole models: output layer k is
layer k of every model, and the output has the layout model's layers. A ``slices:`` config
stacks its slices: output layer ``offset + i`` of a slice is merged from layer ``start + i`` of
each of its sources, with one counter across the slices. The tensors of an output layer are
those of one source's layer (the layout model when it is a source of the slice, else the
slice's first source), named as the layout model names them. Tensors outside the layers follow
mergekit: the embedding and everything before the layers come from the first slice's sources,
the final norm and ``lm_head`` from the last slice's.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from .api.architecture import TensorRole
from .api.errors import ConfigError
from .config import MergeConfig
from .configfile import Problems
from .models import Model, ModelSet

#: Roles taken from the last slice's sources (the rest outside the layers come from the first's).
POST_ROLES = ("final_norm", "lm_head")
#: config.json lists with one entry per layer, rebuilt for a layer-stacked output.
PER_LAYER_KEYS = ("layer_types", "no_rope_layers")


@dataclass
class Source:
    """A model feeding an output slice, from its input layer ``start``."""

    model: Model
    start: int
    parameters: Mapping[str, Any]  # its own (per-model) parameters
    path: str  # where the config names it: "models[1]", "slices[0].sources[1]"


@dataclass
class OutputSlice:
    merged: list[Source]  # the strategy's inputs, in order (the base is not one of them)
    base: Source | None  # the strategy's base model, if it takes one
    template: Source  # whose layers give the output layers their tensors
    parameters: Mapping[str, Any]
    path: str  # "slices[0]"; "" for a models: config
    offset: int  # its first output layer
    length: int

    @property
    def sources(self) -> list[Source]:
        """Everything the slice reads: the base first, then the merged models."""
        return ([self.base] if self.base else []) + self.merged

    def position(self, i: int) -> float:
        """Gradient position of its i-th layer: i/(n−1), or 1 for a one-layer slice."""
        return i / (self.length - 1) if self.length > 1 else 1.0


@dataclass
class LayerMap:
    slices: list[OutputSlice]
    identity: bool  # a models: config (output layer k is layer k of every model)
    _by_layer: dict = field(default_factory=dict, repr=False)  # id(model) → layer → its tensor names
    _layout_names: dict | None = field(default=None, repr=False)  # canonical name at layer 0 → layout's name

    @property
    def num_layers(self) -> int:
        return sum(s.length for s in self.slices)

    def slice_of(self, layer: int) -> tuple[OutputSlice, int]:
        for s in self.slices:
            if s.offset <= layer < s.offset + s.length:
                return s, layer - s.offset
        raise IndexError(layer)

    def layer_tensors(self, model: Model, layer: int) -> list[str]:
        """The tensor names of one layer of a model, in checkpoint order."""
        if id(model) not in self._by_layer:
            index: dict[int, list[str]] = {}
            for name, role in model.roles.items():
                if role.layer is not None:
                    index.setdefault(role.layer, []).append(name)
            self._by_layer[id(model)] = index
        return self._by_layer[id(model)].get(layer, [])

    def output_name(self, layout: Model, template: Model, name: str, layer: int) -> str:
        """The output name of ``template``'s layer tensor ``name`` moved to output layer
        ``layer``: as the layout model names that tensor, else as the template does."""
        if template is not layout:
            if self._layout_names is None:
                self._layout_names = {}
                for n, r in layout.roles.items():
                    at0 = layout.spec.relayer(n, 0) if r.layer is not None else None
                    if at0 is not None:
                        self._layout_names.setdefault(_canonical(layout, at0), n)
            at0 = template.spec.relayer(name, 0)
            own = self._layout_names.get(_canonical(template, at0)) if at0 else None
            if own is not None:
                return layout.spec.relayer(own, layer) or name
        return template.spec.relayer(name, layer) or name

    def skeleton(self, layout: Model) -> Iterator[tuple[str, TensorRole, Model, str, int | None]]:
        """The output tensors in order: (output name, role, the model and tensor whose shape and
        dtype it takes, output layer or None). The layout model's own layers are replaced by the
        output layers, where its first one was."""
        stacked = False
        for name in layout.checkpoint.tensors:
            role = layout.roles[name]
            if role.layer is None or self.identity:
                yield name, role, layout, name, role.layer
                continue
            if stacked:
                continue
            stacked = True
            for s in self.slices:
                template = s.template
                for i in range(s.length):
                    for tname in self.layer_tensors(template.model, template.start + i):
                        yield (self.output_name(layout, template.model, tname, s.offset + i),
                               template.model.roles[tname], template.model, tname, s.offset + i)

    def describe(self) -> list[dict[str, Any]]:
        """Runs of output layers with the input layers they come from (``fusion plan``)."""
        runs = []
        for s in self.slices:
            runs.append({"slice": s.path or "models", "output": [s.offset, s.offset + s.length - 1],
                         "sources": [{"model": f"{src.path} ({src.model.reference})",
                                      "layers": [src.start, src.start + s.length - 1],
                                      "base": src is s.base} for src in s.sources]})
        return runs


def build_layer_map(config: MergeConfig, opened: ModelSet, base: Model | None, merged: list[tuple[Model, Any]],
                    layout: Model, base_mode: str) -> LayerMap:
    """The output slices of ``config``; ``merged`` are the opened models of a ``models:`` config
    with their entries, ``base`` the strategy's base model (None if it takes none), ``base_mode``
    the strategy's ``base`` declaration."""
    if config.slices is None:
        sources = [Source(m, 0, e.parameters, e.path) for m, e in merged]
        base_source = Source(base, 0, {}, "base_model") if base is not None else None
        whole = OutputSlice(sources, base_source, Source(layout, 0, {}, "layout"), {}, "", 0, layout.num_layers)
        return LayerMap([whole], identity=True)
    problems = Problems(config.lines)
    slices, offset = [], 0
    for entry in config.slices:
        base_ref = (entry.base_model or config.base_model) if base_mode != "unused" else None
        slice_base = opened.open(base_ref, f"{entry.path}.base_model" if entry.base_model else "base_model") \
            if base_ref else None
        listed, sources, base_source = [], [], None
        for src in entry.sources:
            model = opened.open(src.reference, src.path)
            depth = model.num_layers
            if src.end > depth:
                problems.add(f"{src.path}.layer_range", f"layer_range [{src.start}, {src.end}] goes past the last "
                                                        f"layer of {model.label}, which has {depth} layers")
            source = Source(model, src.start, src.parameters, src.path)
            listed.append(source)
            if slice_base is not None and model is slice_base and base_source is None:
                base_source = source
            else:
                sources.append(source)
        if slice_base is not None and base_source is None and base_mode == "required":
            problems.add(f"{entry.path}.sources", f"the base model {slice_base.label} is not a source of this "
                                                  f"slice; add it with the layer_range its layers come from")
        template = next((s for s in listed if s.model is layout), listed[0])
        slices.append(OutputSlice(sources, base_source, template, entry.parameters, entry.path, offset,
                                  entry.length))
        offset += entry.length
    problems.done()
    return LayerMap(slices, identity=False)


def _canonical(model: Model, name: str) -> str:
    role = model.spec.classify(name)
    return role.canonical if role else name


def input_canonical(template: Model, name: str, layer: int) -> str:
    """The canonical name of ``template``'s layer tensor ``name`` in input layer ``layer``."""
    return _canonical(template, template.spec.relayer(name, layer) or name)


def output_config(layout: Model, layers: LayerMap, vocab_size: int | None) -> dict:
    """The output's config.json: the layout model's, with the stacked layer count and per-layer
    lists, and the vocabulary size of a built tokenizer."""
    config = copy.deepcopy(layout.checkpoint.config)
    spec = layout.spec
    text = spec.text_config_of(config)
    if not layers.identity:
        text[spec.num_layers_key] = layers.num_layers
        for key in PER_LAYER_KEYS:
            if not isinstance(text.get(key), list):
                continue
            values = []
            for s in layers.slices:
                own = s.template.model.spec.text_config_of(s.template.model.checkpoint.config).get(key)
                if not isinstance(own, list) or len(own) < s.template.start + s.length:
                    raise ConfigError(s.path, f"config.json of {s.template.model.label} has no {key} entry for "
                                              f"each of its layers, so the stacked output's cannot be written")
                values += own[s.template.start:s.template.start + s.length]
            text[key] = values
    if vocab_size is not None:
        text["vocab_size"] = vocab_size
        if text is not config and "vocab_size" in config:
            config["vocab_size"] = vocab_size
    return config
