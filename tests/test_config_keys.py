"""Every key and value mergekit 0.1.5 accepts, with its meaning (`dtype` as the output dtype,
numeric booleans, gradients at t = 0 outside the layers, `name`, settings without effect), what
fusion says where it computes differently on purpose, and every problem of a config reported
in one run: one line each with its path and line, exit code 1, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import fusion

torch = pytest.importorskip("torch")
from safetensors.torch import load_file  # noqa: E402

from recipe_models import StandIn, standin_folder, write_config  # noqa: E402


@pytest.fixture(scope="module")
def llama(standins) -> dict[str, Path]:
    return {name: standin_folder(standins, StandIn("llama3", 4, i)) for i, name in enumerate("PAB")}


def tensors(folder: Path) -> dict:
    return load_file(folder / "model.safetensors")


def test_dtype_is_the_output_dtype_when_out_dtype_is_absent(llama, tmp_path):
    cfg = write_config(tmp_path, """\
        merge_method: task_arithmetic
        base_model: {P}
        models: [{A}, {B}]
        dtype: float16
        """, **llama)
    fusion.merge(cfg, tmp_path / "out", card=False)
    assert {t.dtype for t in tensors(tmp_path / "out").values()} == {torch.float16}
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written.get("dtype", written.get("torch_dtype")) == "float16"


def test_gradients_give_the_embedding_final_norm_and_head_their_first_value(llama, tmp_path):
    cfg = write_config(tmp_path, """\
        merge_method: linear
        models:
          - {{model: {A}, parameters: {{weight: [1, 0]}}}}
          - {{model: {B}, parameters: {{weight: [0, 1]}}}}
        out_dtype: bfloat16
        """, **llama)
    fusion.merge(cfg, tmp_path / "out", card=False)
    out, a, b = tensors(tmp_path / "out"), tensors(llama["A"]), tensors(llama["B"])
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                 "model.layers.0.mlp.up_proj.weight"):
        assert torch.equal(out[name], a[name]), name
    assert torch.equal(out["model.layers.3.mlp.up_proj.weight"], b["model.layers.3.mlp.up_proj.weight"])


@pytest.mark.parametrize("written, value", [("1.0", True), ("0", False), ("yes", True), ("'off'", False)])
def test_numeric_and_word_booleans_read_as_mergekit_reads_them(llama, tmp_path, written, value):
    cfg = write_config(tmp_path, f"""\
        merge_method: linear
        models: [{{A}}, {{B}}]
        parameters: {{{{normalize: {written}}}}}
        """, **llama)
    with fusion.plan(cfg) as plan:
        assert {t.params["normalize"] for t in plan.tensors if t.action == "merge"} == {value}


def test_name_and_settings_without_effect_are_accepted(llama, tmp_path):
    cfg = write_config(tmp_path, """\
        name: First
        merge_method: linear
        slices:
          - sources: [{{model: {A}, layer_range: [0, 4]}}, {{model: {B}, layer_range: [0, 4]}}]
            residual_weight: 0.5
        parameters: {{select_topk: 0.5}}
        """, **llama)
    with fusion.plan(cfg) as plan:
        notes = "\n".join(plan.notices)
    assert "slices[0].residual_weight (line 5): residual_weight has no effect" in notes
    assert "parameters.select_topk (line 6): linear has no parameter 'select_topk' (it is one of sce's); it is " \
           "ignored" in notes
    fusion.merge(cfg, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "fusion.json").read_text())["name"] == "First"
    assert "# First" in (tmp_path / "out" / "README.md").read_text().splitlines()


def test_the_plan_says_where_fusion_computes_differently_on_purpose(llama, tmp_path):
    body = """\
        merge_method: ties
        base_model: {P}
        models: [{{model: {A}, parameters: {{density: 0.5}}}}, {{model: {B}, parameters: {{density: 1}}}}]
        """
    with fusion.plan(write_config(tmp_path, body, **llama)) as plan:
        notes = plan.notices
    assert any(n.startswith("float32 math: mergekit computes ties in bfloat16 here") for n in notes), notes
    assert any(n.startswith("top-k ties:") for n in notes)
    with fusion.plan(write_config(tmp_path, body + "dtype: float32\n", **llama)) as plan:
        assert not any(n.startswith("float32 math") for n in plan.notices)
    with fusion.plan(write_config(tmp_path, """\
        merge_method: sce
        base_model: {P}
        models: [{A}, {B}]
        parameters: {{lambda: 0.8}}
        dtype: float32
        """, **llama)) as plan:
        notes = plan.notices
    assert any(n.startswith("SCE weights:") for n in notes)
    assert "lambda = 0.8 scales SCE's merged task vector; mergekit's sce has no lambda (it ignores one)" in notes
    assert not any(n.startswith("top-k ties") for n in notes)  # select_topk 1 selects nothing


def test_a_base_model_a_method_does_not_take_is_said(llama, tmp_path):
    cfg = write_config(tmp_path, "merge_method: linear\nbase_model: {P}\nmodels: [{A}, {B}]\n", **llama)
    with fusion.plan(cfg) as plan:
        assert any(n.startswith("base_model (line 2): linear takes no base model") for n in plan.notices)


PLUGIN = '''\
import fusion


class Pair(fusion.Strategy):
    name = "pair"
    description = "Average of exactly two models (a test plugin)."
    base = "required"
    min_models, max_models = 3, 3
    parameters = (fusion.Param("gain", float, required=True, minimum=0),
                  fusion.Param("share", float, 0.5, per_model=True, maximum=1))

    def merge(self, base, tensors, params, context):
        return base + params["gain"] * sum(t - base for t in tensors) / 2


@fusion.hookimpl
def register_strategies(register):
    register(Pair())
'''


def test_every_problem_of_a_config_comes_out_in_one_run(llama, tmp_path, capsys, monkeypatch):
    """Ten problems of every kind: keys, values, required and misplaced parameters, model counts,
    slices and the tokenizer block; one line each with its path and line, nothing written."""
    from fusion import cli, host

    plugin = tmp_path / "pair_plugin.py"
    plugin.write_text(PLUGIN)
    cfg = write_config(tmp_path, """\
        merge_method: pair
        base_model: {P}
        dype: float16
        gain: 2
        models:
          - model: {A}
            parameters: {{share: 1.5, densty: 0.5}}
          - model: {B}
            weight: 0.5
          - model: {P}
        parameters:
          share: heavy
        tokenizer_source: union
        tokenizer: {{source: base}}
        chat_template: vicuna
        out_dtype: float8
        """, **llama)
    monkeypatch.setattr(host, "_local_plugins", [])  # --plugin is process-wide: undone after the test
    host.reset()
    try:
        with pytest.raises(SystemExit) as exited:
            cli.main(["--plugin", str(plugin), "merge", str(cfg), "-o", str(tmp_path / "out")])
    finally:
        monkeypatch.undo()
        host.reset()
    assert exited.value.code == 1
    err = capsys.readouterr().err
    lines = [line.removeprefix("error: ") for line in err.splitlines() if line.strip()]
    expected = [
        "dype (line 3): unknown key; did you mean `dtype`?",
        "gain (line 4): unknown key; gain is a parameter of pair: put it under `parameters:`",
        "models[1].weight (line 9): unknown key; weight is a parameter",
        "tokenizer (line 14): give either `tokenizer_source` or the `tokenizer:` block, not both",
        "chat_template (line 15): unknown chat template 'vicuna'",
        "out_dtype (line 16): unknown dtype 'float8'",
        "parameters.share (line 12): share must be a number, not 'heavy'",
        "models[0].parameters.share (line 7): share = 1.5 is out of range",
        "models[0].parameters.densty (line 7): unknown parameter 'densty' for pair",
        "parameters (line 11): pair needs gain",
        "models (line 5): pair merges exactly 3 model(s) besides the base model, but the config gives 2",
    ]
    assert len(lines) == len(expected), err
    for want in expected:
        assert any(line.startswith(want) for line in lines), (want, lines)
    assert "Traceback" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("body, mentions", [
    ("modules: {{vision_tower: {{models: [{A}]}}}}\n", ["modules.vision_tower", "unknown module", "merge_parts"]),
    ("models: [{A}]\nslices: [{{sources: [{{model: {B}, layer_range: [0, 4]}}]}}]\n",
     ["slices", "exactly one of `models`, `slices` or `modules`"]),
    ("models: [{A}, {B}]\ntokenizer: {{tokens: {{x: {{force: true}}}}}}\n", ["tokenizer.tokens.x", "needs `source:`"]),
    ("models: [{A}, {B}]\ntokenizer: {{tokens: {{x: {{source: {{kind: model_token, model: {A}, token: a, token_id: 1}}}}}}}}\n",
     ["tokenizer.tokens.x.source", "exactly one of `token` or `token_id`"]),
    ("models: [{A}, {B}]\ntokenizer: {{source: union, pad_to_multiple_of: 0}}\n",
     ["tokenizer.pad_to_multiple_of", "1 or more"]),
    ("models: [{A}, {B}]\ntokenizer: {{source: union, padding: 8}}\n", ["tokenizer.padding", "unknown key"]),
])
def test_structure_problems_name_their_path(llama, tmp_path, body, mentions):
    cfg = write_config(tmp_path, "merge_method: linear\n" + body, **llama)
    with pytest.raises(fusion.ConfigError) as raised:
        fusion.plan(cfg)
    assert all(m in str(raised.value) for m in mentions), str(raised.value)


@pytest.mark.parametrize("default", ['"*"', "null"])
def test_a_filter_of_any_tensor_is_written_as_mergekit_writes_it(llama, tmp_path, default):
    cfg = write_config(tmp_path, f"""\
        merge_method: linear
        models: [{{A}}, {{B}}]
        parameters:
          weight: [{{{{filter: mlp, value: 2}}}}, {{{{filter: {default}, value: 0.5}}}}]
        """, **llama)
    with fusion.plan(cfg) as plan:
        weights = {t.name: t.params["weight"] for t in plan.tensors if t.action == "merge"}
    assert weights["model.layers.0.mlp.up_proj.weight"] == [2.0, 2.0]
    assert weights["model.layers.0.self_attn.q_proj.weight"] == [0.5, 0.5]
