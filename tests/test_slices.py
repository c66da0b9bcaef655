"""Layer stacking with `slices` (and `modules`), checked tensor by tensor against expectations
built by hand from the input models: output layers numbered across slices, each slice's
sources merged layer by layer, gradients restarting in every slice, per-model filters tested on
the input's names, per-slice base models, and the output's config.json."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

import fusion

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

from recipe_models import StandIn, standin_folder, write_config  # noqa: E402


def tensors(folder: Path) -> dict:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update({k: v.float() for k, v in load_file(f).items()})
    return out


@pytest.fixture(scope="module")
def qwen(standins, tmp_path_factory) -> dict[str, Path]:
    """Three 8-layer Qwen2 stand-ins; A and B with different per-layer attention types."""
    root = tmp_path_factory.mktemp("qwen")
    out = {}
    for name, index in (("P", 0), ("A", 1), ("B", 2), ("Q", 3)):
        folder = root / name
        src = standin_folder(standins, StandIn("qwen2", 8, index))
        folder.mkdir()
        for f in src.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        config = json.loads((folder / "config.json").read_text())
        kinds = {"A": ("full_attention", "sliding_attention"), "B": ("sliding_attention", "full_attention")}
        if name in kinds:
            config.update(use_sliding_window=True, sliding_window=16, max_window_layers=0,
                          layer_types=[kinds[name][i % 2] for i in range(8)])
        (folder / "config.json").write_text(json.dumps(config))
        out[name] = folder
    return out


STACK = """\
    merge_method: linear
    slices:
      - sources:
          - model: {A}
            layer_range: [0, 4]
            parameters: {{weight: [1.0, 0.0]}}
          - model: {B}
            layer_range: [2, 6]
            parameters: {{weight: 0.5}}
      - sources:
          - model: {B}
            layer_range: [0, 8]
            parameters: {{weight: 0.5}}
    out_dtype: float32
    """


def test_two_models_of_8_layers_stack_into_12_as_built_by_hand(qwen, tmp_path):
    config = write_config(tmp_path, STACK, A=qwen["A"], B=qwen["B"])
    fusion.merge(config, tmp_path / "out", kernel="torch", card=False)
    out, a, b = tensors(tmp_path / "out"), tensors(qwen["A"]), tensors(qwen["B"])

    def linear(x, y, wx, wy):
        return x.mul(wx).add(y, alpha=wy).div(wx + wy)

    expected = {}
    for k in range(4):  # slice 0: A's layer k with B's layer 2 + k, A's weight from 1 down to 0
        t = k / 3
        wa = 1.0 * (1 - t) + 0.0 * t
        for name in [n for n in a if n.startswith(f"model.layers.{k}.")]:
            rest = name.removeprefix(f"model.layers.{k}.")
            expected[name] = linear(a[name], b[f"model.layers.{2 + k}.{rest}"], wa, 0.5)
    for k in range(4, 12):  # slice 1: B's layers 0..7 alone
        for name in [n for n in b if n.startswith(f"model.layers.{k - 4}.")]:
            expected[f"model.layers.{k}.{name.removeprefix(f'model.layers.{k - 4}.')}"] = b[name]
    # the embedding comes from the first slice's sources (t = 0), the head and final norm from the last's
    expected["model.embed_tokens.weight"] = linear(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"],
                                                   1.0, 0.5)
    expected["model.norm.weight"] = b["model.norm.weight"]
    expected["lm_head.weight"] = b["lm_head.weight"]
    assert set(out) == set(expected)
    for name, value in expected.items():
        assert torch.equal(out[name], value), name

    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    a_types = json.loads((qwen["A"] / "config.json").read_text())["layer_types"]
    b_types = json.loads((qwen["B"] / "config.json").read_text())["layer_types"]
    assert cfg["num_hidden_layers"] == 12 and cfg["layer_types"] == a_types[:4] + b_types
    model, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert len(model.model.layers) == 12


def test_plan_shows_which_input_layers_each_output_layer_comes_from(qwen, tmp_path):
    config = write_config(tmp_path, STACK, A=qwen["A"], B=qwen["B"])
    with fusion.plan(config) as plan:
        text, data = plan.render(), plan.describe()
    lines = text.splitlines()
    at = lines.index("layers      12 output layers:")
    assert "0-3 <- slices[0].sources[0]" in lines[at + 1] and " 0-3 + slices[0].sources[1]" in lines[at + 1]
    assert lines[at + 1].endswith("2-5   [slices[0]]")
    assert "4-11 <- slices[1].sources[0]" in lines[at + 2] and lines[at + 2].endswith("0-7   [slices[1]]")
    assert [(r["output"], [s["layers"] for s in r["sources"]]) for r in data["layers"]] == [
        ([0, 3], [[0, 3], [2, 5]]), ([4, 11], [[0, 7]])]


def test_modules_default_is_the_same_as_top_level_slices(qwen, tmp_path):
    top = write_config(tmp_path, STACK, A=qwen["A"], B=qwen["B"])
    fusion.merge(top, tmp_path / "top", card=False)
    body = textwrap.indent(textwrap.dedent(STACK).split("slices:\n", 1)[1].split("out_dtype")[0], "    ")
    nested = tmp_path / "nested.yaml"
    text = write_config(tmp_path, "merge_method: linear\nmodules:\n  default:\n    slices:\n" + body
                        + "out_dtype: float32\n", A=qwen["A"], B=qwen["B"]).read_text()
    nested.write_text(textwrap.dedent(text))
    fusion.merge(nested, tmp_path / "nested", card=False)
    assert (tmp_path / "top" / "model.safetensors").read_bytes() == (tmp_path / "nested" / "model.safetensors").read_bytes()


def test_gradients_restart_in_every_slice(qwen, tmp_path):
    """Two slices of 2 layers and one of 1 with A's weight [1, 0] and B's [0, 1]: the output
    layers are A, B, A, B (t runs over each slice), then B (a one-layer slice has t = 1); outside
    the layers t = 0, so the embedding and the head are A's."""
    config = write_config(tmp_path, """\
        merge_method: linear
        slices:
          - sources:
              - {{model: {A}, layer_range: [0, 2], parameters: {{weight: [1, 0]}}}}
              - {{model: {B}, layer_range: [0, 2], parameters: {{weight: [0, 1]}}}}
          - sources:
              - {{model: {A}, layer_range: [4, 6], parameters: {{weight: [1, 0]}}}}
              - {{model: {B}, layer_range: [4, 6], parameters: {{weight: [0, 1]}}}}
          - sources:  # one layer: t = 1, the gradients' last values
              - {{model: {A}, layer_range: [7, 8], parameters: {{weight: [1, 0]}}}}
              - {{model: {B}, layer_range: [7, 8], parameters: {{weight: [0, 1]}}}}
        out_dtype: float32
        """, A=qwen["A"], B=qwen["B"])
    fusion.merge(config, tmp_path / "out", card=False)
    out, a, b = tensors(tmp_path / "out"), tensors(qwen["A"]), tensors(qwen["B"])
    q = ".self_attn.q_proj.weight"
    for k, (model, layer) in enumerate([(a, 0), (b, 1), (a, 4), (b, 5), (b, 7)]):
        assert torch.equal(out[f"model.layers.{k}{q}"], model[f"model.layers.{layer}{q}"]), k
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(out[name], a[name]), name


def test_per_model_filters_test_input_names_and_global_ones_output_names(qwen, tmp_path):
    """A's layers 4 and 5 become output layers 0 and 1. A's own filter on `layers.5.` hits output
    layer 1 (A's weight 0 there); the global `normalize` filter on `layers.0.` hits output layer
    0 (a plain sum there), though no input tensor of that layer is named so."""
    config = write_config(tmp_path, """\
        merge_method: linear
        parameters:
          normalize: [{{filter: layers.0., value: false}}, {{value: true}}]
        slices:
          - sources:
              - model: {A}
                layer_range: [4, 6]
                parameters:
                  weight: [{{filter: layers.5., value: 0}}, {{value: 1}}]
              - {{model: {B}, layer_range: [4, 6], parameters: {{weight: 1}}}}
        out_dtype: float32
        """, A=qwen["A"], B=qwen["B"])
    fusion.merge(config, tmp_path / "out", kernel="torch", card=False)
    out, a, b = tensors(tmp_path / "out"), tensors(qwen["A"]), tensors(qwen["B"])
    q = ".mlp.up_proj.weight"
    assert torch.equal(out[f"model.layers.1{q}"], b[f"model.layers.5{q}"])
    assert torch.equal(out[f"model.layers.0{q}"], a[f"model.layers.4{q}"].add(b[f"model.layers.4{q}"]))


def test_a_per_slice_base_model(qwen, tmp_path):
    """task_arithmetic with the base P for slice 0 and Q for slice 1: each slice's layers take
    their own base's task vectors; the embedding the first slice's, the head the last slice's."""
    config = write_config(tmp_path, """\
        merge_method: task_arithmetic
        base_model: {P}
        slices:
          - sources:
              - {{model: {P}, layer_range: [0, 4]}}
              - {{model: {A}, layer_range: [0, 4]}}
          - base_model: {Q}
            sources:
              - {{model: {Q}, layer_range: [4, 8]}}
              - {{model: {A}, layer_range: [4, 8]}}
        parameters: {{lambda: 0.5}}
        out_dtype: float32
        """, P=qwen["P"], Q=qwen["Q"], A=qwen["A"])
    fusion.merge(config, tmp_path / "out", kernel="torch", card=False)
    out, p, q, a = (tensors(x) for x in (tmp_path / "out", qwen["P"], qwen["Q"], qwen["A"]))

    def ta(base, model):
        return base.add((model - base).mul(1.0), alpha=0.5)

    w = ".mlp.down_proj.weight"
    assert torch.equal(out[f"model.layers.1{w}"], ta(p[f"model.layers.1{w}"], a[f"model.layers.1{w}"]))
    assert torch.equal(out[f"model.layers.6{w}"], ta(q[f"model.layers.6{w}"], a[f"model.layers.6{w}"]))
    assert torch.equal(out["model.embed_tokens.weight"], ta(p["model.embed_tokens.weight"], a["model.embed_tokens.weight"]))
    assert torch.equal(out["lm_head.weight"], ta(q["lm_head.weight"], a["lm_head.weight"]))


@pytest.mark.parametrize("slices, mentions", [
    ("- sources: [{{model: {A}, layer_range: [0, 4]}}, {{model: {B}, layer_range: [0, 3]}}]",
     ["slices[0].sources", "same number of layers", "slices[0].sources[0] has 4", "slices[0].sources[1] has 3"]),
    ("- sources: [{{model: {A}, layer_range: [4, 2]}}]", ["slices[0].sources[0].layer_range", "0 <= start < end"]),
    ("- sources: [{{model: {A}, layer_range: 4}}]", ["slices[0].sources[0].layer_range", "a pair"]),
    ("- sources: [{{model: {A}, layer_range: [0, 4]}}, {{model: {A}, layer_range: [4, 8]}}]",
     ["slices[0].sources", "twice"]),
    ("- sources: [{{model: {A}, layer_range: [0, 4], weight: 1}}]", ["slices[0].sources[0].weight", "unknown key"]),
    ("- {{sources: [{{model: {A}, layer_range: [0, 4]}}], residual: 1}}", ["slices[0].residual", "unknown key"]),
])
def test_slice_problems_name_their_path(qwen, tmp_path, slices, mentions):
    config = write_config(tmp_path, "merge_method: linear\nslices:\n  " + slices + "\n", A=qwen["A"], B=qwen["B"])
    with pytest.raises(fusion.ConfigError) as raised:
        fusion.plan(config)
    message = str(raised.value)
    assert all(m in message for m in mentions), message


def test_a_layer_range_past_the_model_and_a_base_outside_its_slice_are_reported_together(qwen, tmp_path):
    config = write_config(tmp_path, """\
        merge_method: task_arithmetic
        base_model: {P}
        slices:
          - sources: [{{model: {A}, layer_range: [0, 4]}}, {{model: {B}, layer_range: [4, 8]}}]
          - sources: [{{model: {P}, layer_range: [6, 10]}}, {{model: {A}, layer_range: [6, 10]}}]
        """, P=qwen["P"], A=qwen["A"], B=qwen["B"])
    with pytest.raises(fusion.ConfigError) as raised:
        fusion.plan(config)
    lines = str(raised.value).splitlines()
    assert any(line.startswith("slices[0].sources (line 4): the base model") for line in lines), lines
    with pytest.raises(fusion.ConfigError) as raised:
        fusion.plan(write_config(tmp_path, """\
            merge_method: linear
            slices:
              - sources: [{{model: {A}, layer_range: [6, 10]}}, {{model: {B}, layer_range: [6, 10]}}]
            """, A=qwen["A"], B=qwen["B"]))
    lines = str(raised.value).splitlines()
    assert len(lines) == 2 and all("goes past the last layer" in line and "8 layers" in line for line in lines)
