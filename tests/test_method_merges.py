"""slerp, nuslerp, multislerp, karcher, model_stock, nearswap, arcee_fusion, ram, ramplus_tl and
passthrough through the engine: what `fusion plan` refuses (model counts, missing required
parameters) before reading any weight, how a base model is treated, and real merges of sharded
bf16 transformers models that load back with every key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fusion
from checkpoints import Shape, load_folder, random_tensors, save_checkpoint
from fusion.host import get_strategy

transformers = pytest.importorskip("transformers")

METHODS = {  # name: (needs a base, models, parameters)
    "slerp": (True, 1, {"t": 0.4}),
    "nuslerp": (True, 2, {"weight": 0.5}),
    "multislerp": (False, 3, {"weight": 0.5}),
    "karcher": (False, 3, {}),
    "model_stock": (True, 2, {}),
    "nearswap": (True, 1, {"t": 0.005}),
    "arcee_fusion": (True, 1, {}),
    "ram": (True, 3, {"epsilon": 0.004}),
    "ramplus_tl": (True, 3, {"epsilon": 0.004}),
    "passthrough": (False, 1, {"scale": [{"filter": "o_proj", "value": 0.5}]}),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A small safetensors base and three fine-tunes (headers are all a plan reads)."""
    root = tmp_path_factory.mktemp("tiny")
    shape = Shape(family="llama")
    base = random_tensors(shape, "bfloat16", 0)
    save_checkpoint(root / "base", shape, "bfloat16", base)
    for i in (1, 2, 3):
        save_checkpoint(root / f"m{i}", shape, "bfloat16", random_tensors(shape, "bfloat16", i, like=base))
    return root


def config(method: str, models, base: str | None = "base", **parameters) -> dict:
    out = {"merge_method": method, "models": [{"model": m} for m in models]}
    if base:
        out["base_model"] = base
    if parameters:
        out["parameters"] = parameters
    return out


@pytest.mark.parametrize("method,models,message", [
    ("slerp", ["m1", "m2"], "slerp merges exactly 1 model(s) besides the base model, but the config gives 2"),
    ("nearswap", ["m1", "m2"], "nearswap merges exactly 1 model(s) besides the base model, but the config gives 2"),
    ("arcee_fusion", ["m1", "m2"], "arcee_fusion merges exactly 1 model(s) besides the base model"),
    ("nuslerp", ["m1", "m2", "m3"], "nuslerp merges exactly 2 model(s) besides the base model, but the config gives 3"),
    ("nuslerp", ["base", "m1"], "nuslerp merges exactly 2 model(s) besides the base model, but the config gives 1"),
    ("model_stock", ["m1"], "model_stock merges 2 or more model(s) besides the base model, but the config gives 1"),
    ("passthrough", ["m1", "m2"], "passthrough merges exactly 1 model(s), but the config gives 2"),
])
def test_plan_refuses_the_wrong_number_of_models(tiny, method, models, message):
    params = {"t": 0.5} if method in ("slerp", "nearswap") else {"weight": 1.0} if method == "nuslerp" else {}
    with pytest.raises(fusion.ConfigError) as raised:
        fusion.plan(config(method, models, **params), base_dir=tiny)
    assert message in str(raised.value)


@pytest.mark.parametrize("method,base,models,missing", [
    ("slerp", "base", ["m1"], "slerp needs t"),
    ("nearswap", "base", ["m1"], "nearswap needs t"),
    ("nuslerp", None, ["m1", "m2"], "nuslerp needs weight (in models[0], models[1] or under the top-level"),
    ("multislerp", "base", ["base", "m1", "m2"], "multislerp needs weight (in models[1], models[2] or"),
])
def test_plan_refuses_missing_required_parameters(tiny, method, base, models, missing):
    with pytest.raises(fusion.ConfigError) as raised:
        fusion.plan(config(method, models, base), base_dir=tiny)
    assert missing in str(raised.value)


def test_cli_plan_says_why_in_one_line(tiny, capsys):
    from fusion import cli

    (tiny / "slerp3.yaml").write_text(
        "merge_method: slerp\nbase_model: ./base\nmodels:\n  - model: ./m1\n  - model: ./m2\nparameters: {t: 0.5}\n")
    with pytest.raises(SystemExit) as code:
        cli.main(["plan", str(tiny / "slerp3.yaml")])
    assert code.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "slerp merges exactly 1 model(s)" in err[0] and "Traceback" not in err[0]


def test_optional_base_listed_under_models_is_left_out(tiny):
    with fusion.plan(config("nuslerp", ["base", "m1", "m2"], weight=1.0), base_dir=tiny) as plan:
        assert [m.folder.name for m in plan.models] == ["m1", "m2"]
        assert any("is the base model; it is left out" in n for n in plan.notices)
        merged = [t for t in plan.tensors if t.action == "merge"]
        assert merged and all(t.base is not None and len(t.inputs) == 2 for t in merged)


@pytest.mark.parametrize("models,listed", [(["m1", "m2"], False), (["base", "m1"], True)])
def test_methods_without_a_base_say_what_base_model_does(tiny, models, listed):
    with fusion.plan(config("karcher", models), base_dir=tiny) as plan:
        merged = [t for t in plan.tensors if t.action == "merge"]
        assert all(t.base is None and len(t.inputs) == 2 for t in merged)
        (note,) = [n for n in plan.notices if "base_model" in n]
        assert ("only because it is listed" in note) is listed
        assert "layout model" in note


def test_plugins_lists_the_methods_with_their_parameters(capsys):
    from fusion import cli

    cli.main(["plugins"])
    out = capsys.readouterr().out
    for name, (_, _, params) in METHODS.items():
        assert f"strategy {name}:" in out
    for text in ("t (float, global, required)", "nuslerp_row_wise (bool, global, default False)",
                 "eps (float, global, default 1e-08 in (0, inf))", "max_iter (int, global, default 10",
                 "filter_wise (bool, global, default False)", "scale (float, per model, default None)",
                 "merges exactly 2 model(s); base_model optional"):
        assert text in out


def test_a_non_finite_result_stops_the_merge_and_writes_nothing(tiny, tmp_path):
    shape = Shape(family="llama")
    bad = load_folder(tiny / "m1")
    name = "model.layers.0.mlp.up_proj.weight"
    bad[name] = bad[name].clone()
    bad[name][0, 0] = float("nan")
    save_checkpoint(tmp_path / "bad", shape, "bfloat16", bad)
    cfg = config("slerp", [str(tmp_path / "bad")], str(tiny / "base"), t=0.5)
    with pytest.raises(fusion.MergeError, match=f"merged tensor {name} has .* non-finite"):
        fusion.merge(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # t = 0 is the base itself: the other model is not read, nothing is non-finite
    fusion.merge(config("slerp", [str(tmp_path / "bad")], str(tiny / "base"), t=0.0), tmp_path / "out")
    assert torch.equal(load_folder(tmp_path / "out")[name], load_folder(tiny / "base")[name])


# ---------------------------------------------------------------------------------------------
# Real models: transformers config classes, save_pretrained, sharded bf16

FAMILIES = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config"}


def build(folder: Path, family: str, seed: int, base_state=None) -> dict:
    cfg = getattr(transformers, FAMILIES[family])(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, tie_word_embeddings=False,
        head_dim=8)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    if base_state is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                noise = torch.randn(p.shape) * 0.01
                p.copy_(base_state[name].float() + noise * (torch.rand(p.shape) < 0.5))
    model.save_pretrained(folder, max_shard_size="40KB")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for family in FAMILIES:
        root = tmp_path_factory.mktemp(family)
        base = build(root / "base", family, 0)
        for i in (1, 2, 3):
            build(root / f"ft{i}", family, i, base)
        assert (root / "base" / "model.safetensors.index.json").exists()  # really sharded
        out[family] = root
    return out


def expected_tensors(method: str, root: Path, cfg: dict) -> dict[str, torch.Tensor]:
    """Every tensor merged by the strategy's own torch reference, from the inputs' values."""
    strategy = get_strategy(method)
    base = load_folder(root / "base") if cfg.get("base_model") else None
    models = [load_folder(root / m["model"]) for m in cfg["models"]]
    out = {}
    for name, like in models[0].items():
        params = {}
        for p in strategy.parameters:
            value = cfg.get("parameters", {}).get(p.name, p.default)
            if isinstance(value, list):  # a filter list
                value = next((e["value"] for e in value if e.get("filter", "") in name), None)
            params[p.name] = [value] * len(models) if p.per_model else value
        theta0 = None if base is None else base[name].float()
        context = fusion.TensorContext(name, shape=tuple(like.shape))
        out[name] = strategy.merge(theta0, [m[name].float() for m in models], params, context).to(like.dtype)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_merges_real_models_that_load_with_every_key(families, tmp_path, method):
    family = sorted(FAMILIES)[sorted(METHODS).index(method) % len(FAMILIES)]
    root = families[family]
    with_base, count, params = METHODS[method]
    cfg = config(method, [f"ft{i}" for i in range(1, count + 1)], "base" if with_base else None, **params)
    summary = fusion.merge(cfg, tmp_path / "out", base_dir=root, shard_size="20KB")
    assert summary.merged > 0
    model, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    merged = load_folder(tmp_path / "out")
    assert len(json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]) == len(merged)
    for name, value in expected_tensors(method, root, cfg).items():
        assert merged[name].dtype == torch.bfloat16
        assert torch.equal(merged[name], value), name
    with torch.no_grad():
        logits = model(torch.arange(10).unsqueeze(0)).logits
    assert torch.isfinite(logits).all()
