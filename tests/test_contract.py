"""The strategy contract as a plugin sees it, and the Python API: the TensorContext each tensor is
merged in, model counts and required parameters refused at plan time, seeds for strategies that
draw random numbers, the one override rule for names registered twice, every config problem
reported at once, and MergeConfig.from_mapping validating like a file."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

import fusion
from fusion import host
from fusion.api.random import GOLDEN, mix, tensor_seed, uniform

torch = pytest.importorskip("torch")
from safetensors.torch import load_file  # noqa: E402

from fusion.demo import TINY_QWEN2  # noqa: E402
from hostile import family  # noqa: E402,F401

PLUGIN = '''\
import fusion
import torch
from fusion.api.random import uniform

SEEN = []


class Probe(fusion.Strategy):
    """Averages, and records what it is told about each tensor."""
    name = "probe"
    description = "Average, recording each tensor's context (a test plugin)."
    base = "unused"
    min_models, max_models = 2, 2
    parameters = (fusion.Param("gain", float, required=True),)

    def merge(self, base, tensors, params, context):
        SEEN.append(context)
        return params["gain"] * sum(tensors) / len(tensors)


class Noise(fusion.Strategy):
    """The first model plus seeded noise: the noise depends only on the seed and the index."""
    name = "noise"
    description = "First model plus seeded noise (a test plugin)."
    base = "unused"
    random = True
    elementwise = True

    def merge(self, base, tensors, params, context):
        u = uniform(context.seed, context.start, tensors[0].numel())
        return tensors[0] + torch.from_numpy(u).reshape(tensors[0].shape) * 1e-3


class Linear(fusion.Strategy):
    """Replaces the built-in linear: the later registration wins."""
    name = "linear"
    description = "The first model, unchanged (a test plugin replacing linear)."
    base = "unused"

    def merge(self, base, tensors, params, context):
        return tensors[0]


@fusion.hookimpl
def register_strategies(register):
    register(Probe())
    register(Noise())
    register(Linear())
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    path = tmp_path / "probe_plugin.py"
    path.write_text(PLUGIN)
    monkeypatch.setattr(host, "_local_plugins", [])
    host.add_local_plugin(str(path))
    host.host()  # loads the plugins, the local file among them
    yield __import__("sys").modules["fusion_local_plugin_probe_plugin"]
    monkeypatch.setattr(host, "_local_plugins", [])
    host.reset()


def config(method: str, *models: str, **top) -> dict:
    return {"merge_method": method, "models": [{"model": m} for m in models], **top}


def test_the_strategy_is_told_which_tensor_it_merges(family, plugin, tmp_path):
    fusion.merge(config("probe", "chat", "code", parameters={"gain": 1.0}), tmp_path / "out", base_dir=family)
    seen = {c.name: c for c in plugin.SEEN}
    layers = TINY_QWEN2["num_hidden_layers"]
    q = seen["model.layers.1.self_attn.q_proj.weight"]
    assert (q.canonical, q.role, q.part, q.layer, q.num_layers) == (
        "layers.1.self_attn.q_proj.weight", "layer", "language_model", 1, layers)
    assert q.shape == (TINY_QWEN2["hidden_size"],) * 2 and q.start == 0
    assert q.models == ("models[0] (chat)", "models[1] (code)")
    assert seen["model.embed_tokens.weight"].role == "embedding" and seen["lm_head.weight"].role == "lm_head"
    assert seen["model.norm.weight"].layer is None
    assert len(seen) == len(load_file(str(tmp_path / "out" / "model.safetensors")))


def test_model_counts_and_required_parameters_are_refused_at_plan_time(family, plugin):
    with pytest.raises(fusion.ConfigError, match=r"models.*probe merges exactly 2 model\(s\).*gives 3"):
        fusion.plan(config("probe", "chat", "code", "base", parameters={"gain": 1.0}), base_dir=family)
    with pytest.raises(fusion.ConfigError, match=r"probe needs gain"):
        fusion.plan(config("probe", "chat", "code"), base_dir=family)


def test_a_seeded_strategy_is_repeatable_and_says_which_seed_it_drew(family, plugin, tmp_path):
    with fusion.plan(config("noise", "chat"), base_dir=family) as plan:
        drawn = plan.random_seed
        assert drawn is not None
        assert any(f"random_seed: {drawn}" in n for n in plan.notices)
    runs = []
    for i, threads in enumerate((1, 2)):
        out = tmp_path / f"out{i}"
        fusion.merge(config("noise", "chat", random_seed=7), out, base_dir=family, threads=threads)
        runs.append((out / "model.safetensors").read_bytes())
        assert json.loads((out / "fusion.json").read_text())["random_seed"] == 7
    assert runs[0] == runs[1]
    other = tmp_path / "other"
    fusion.merge(config("noise", "chat"), other, base_dir=family, random_seed=8)
    assert (other / "model.safetensors").read_bytes() != runs[0]
    merged = load_file(str(tmp_path / "out0" / "model.safetensors"))["model.norm.weight"].float()
    chat = load_file(str(family / "chat" / "model.safetensors"))["model.norm.weight"].float()
    expected = chat + torch.from_numpy(uniform(tensor_seed(7, "model.norm.weight"), 0, chat.numel())) * 1e-3
    torch.testing.assert_close(merged, expected.to(torch.bfloat16).float(), rtol=0, atol=0)


def test_the_generator_is_counter_based():
    seed = tensor_seed(3, "w")
    whole = uniform(seed, 0, 1000)
    assert np.array_equal(np.concatenate([uniform(seed, 0, 400), uniform(seed, 400, 600)]), whole)
    scalar = [(mix((seed + (i + 1) * GOLDEN) % 2**64) >> 40) / 2**24 for i in (0, 999)]
    assert [float(whole[0]), float(whole[999])] == scalar
    assert 0.45 < whole.mean() < 0.55 and whole.min() >= 0 and whole.max() < 1
    assert tensor_seed(3, "w") != tensor_seed(4, "w") != tensor_seed(3, "v")


def test_a_name_registered_twice_uses_the_later_plugin_and_says_so(family, plugin, tmp_path):
    summary = fusion.merge(config("linear", "chat", "code"), tmp_path / "out", base_dir=family)
    note = next(n for n in summary.notices if n.startswith("strategy 'linear' is registered by"))
    assert "linear (model-fusion)" in note and "probe_plugin (local)" in note and "last one loaded" in note
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    chat = load_file(str(family / "chat" / "model.safetensors"))
    assert all(torch.equal(out[n], chat[n]) for n in chat)  # the plugin's "linear": the first model
    builtin = next(i for i in host.plugin_infos() if i.name == "linear")
    assert builtin.shadowed == ["strategy linear (by probe_plugin)"]


def test_every_config_problem_is_reported_at_once(family, tmp_path, capsys):
    from fusion.cli import main

    (tmp_path / "m.yaml").write_text(textwrap.dedent(f"""\
        merge_method: ties
        base_model: {family / 'base'}
        models:
          - model: {family / 'chat'}
            parameters: {{densty: 0.5}}
          - model: {family / 'code'}
            parameters: {{weight: heavy}}
        parameters: {{lamda: 1}}
        out_dtype: float8
        """))
    with pytest.raises(SystemExit) as exit_:
        main(["merge", str(tmp_path / "m.yaml"), "-o", str(tmp_path / "out")])
    assert exit_.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("error: ") for line in lines), lines
    for where in ("out_dtype (line 9)", "parameters.lamda (line 8)", "models[0].parameters.densty (line 5)",
                  "models[1].parameters.weight (line 7)"):
        assert any(where in line for line in lines), (where, lines)
    assert not (tmp_path / "out").exists()


def test_a_mapping_is_validated_like_a_file(family):
    with pytest.raises(fusion.ConfigError, match=r"^colour: unknown key; allowed keys: merge_method"):
        fusion.load({"merge_method": "ties", "models": ["chat"], "colour": 1})
    with pytest.raises(fusion.ConfigError, match=r"^models\[0\]\.parameters\.weight: weight must be a number"):
        fusion.plan({"merge_method": "ties", "base_model": "base",
                     "models": [{"model": "chat", "parameters": {"weight": "x"}}]}, base_dir=family)
    config_ = fusion.load(config("task_arithmetic", "chat", base_model="base"), base_dir=family)
    assert config_.base_dir == Path(family)
    with fusion.plan(config_) as plan:
        assert plan.base.folder == (family / "base").resolve()
    with pytest.raises(TypeError, match="a merge config is a path, a mapping or a MergeConfig"):
        fusion.load(42)
