"""The task-arithmetic family through `fusion merge`: sharded bf16 Llama, Mistral and Qwen2 models
made by transformers, merged, loaded back with no missing or unexpected keys; every tensor equal
to the strategy applied in memory with the seed the plan gives it; the seed recorded and the same
output whatever the threads and kernels; parameter problems reported at plan time; a NaN in an
input stopping the merge on every kernel path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fusion  # noqa: E402
from checkpoints import load_folder  # noqa: E402
from fusion.api import kernels  # noqa: E402
from fusion.api.random import tensor_seed  # noqa: E402
from fusion.host import strategies  # noqa: E402
from test_transformers import build  # noqa: E402

PARAMS = {
    "task_arithmetic": ({"weight": [0.7, 0.4]}, {"lambda": 0.9}),
    "ties": ({"weight": [0.7, 0.4], "density": [0.5, 0.3]}, {}),
    "dare_linear": ({"weight": [0.7, 0.4], "density": [0.6, 0.4]}, {}),
    "dare_ties": ({"weight": [0.7, 0.4], "density": [0.6, 0.4]}, {"normalize": True}),
    "breadcrumbs": ({"weight": [0.7, 0.4], "density": [0.8, 0.5], "gamma": [0.05, 0.1]}, {}),
    "breadcrumbs_ties": ({"weight": [0.7, 0.4], "density": [0.8, 0.5]}, {"gamma": 0.02}),
    "della": ({"weight": [0.7, 0.4], "density": [0.5, 0.6]}, {"epsilon": 0.1}),
    "della_linear": ({"weight": [0.7, 0.4], "density": [0.5, 0.6]}, {"epsilon": 0.2, "lambda": 1.1}),
}
FAMILIES = ["llama", "mistral", "qwen2"]
SEEDED = [name for name in PARAMS if strategies()[name].random]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    """Per family: a bf16 base and two fine-tunes, sharded (qwen2 with tied embeddings)."""
    out = {}
    for family in FAMILIES:
        root = tmp_path_factory.mktemp(family)
        tied = family == "qwen2"
        base = build(root / "base", family, tied, 0)
        build(root / "ft1", family, tied, 1, base)
        build(root / "ft2", family, tied, 2, base, shard="1GB")
        out[family] = root
    return out


def config(method: str) -> dict:
    per_model, global_ = PARAMS[method]
    return {"merge_method": method, "base_model": "./base",
            "models": [{"model": f"./ft{i + 1}", "parameters": {k: v[i] for k, v in per_model.items()}}
                       for i in range(2)],
            "parameters": global_}


def expected(method: str, root: Path, seed: int | None) -> dict[str, torch.Tensor]:
    """Each tensor as the strategy merges it in memory, with the tensor's seed from the plan."""
    strategy = strategies()[method]
    base, fts = load_folder(root / "base"), [load_folder(root / f"ft{i}") for i in (1, 2)]
    per_model, global_ = PARAMS[method]
    params = {p.name: ([p.default] * 2 if p.per_model else p.default) for p in strategy.parameters}
    params.update({k: ([v] * 2 if strategy.param(k).per_model else v) for k, v in global_.items()})
    params.update(per_model)
    out = {}
    for name, b in base.items():
        context = fusion.TensorContext(name, shape=tuple(b.shape),
                                       seed=tensor_seed(seed, name) if seed is not None else 0)
        out[name] = strategy.merge(b.float(), [f[name].float() for f in fts], params, context).to(torch.bfloat16)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(PARAMS))
def test_each_method_end_to_end(zoo, method, tmp_path):
    family = FAMILIES[sorted(PARAMS).index(method) % len(FAMILIES)]
    root = zoo[family]
    seed = 1234 if method in SEEDED else None
    summary = fusion.merge(config(method), tmp_path / "out", base_dir=root, random_seed=seed,
                           shard_size="60KB")
    assert summary.merged > 0
    model, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(8).unsqueeze(0)).logits).all()
    merged, want = load_folder(tmp_path / "out"), expected(method, root, seed)
    assert set(merged) == set(want) - ({"lm_head.weight"} if family == "qwen2" else set())
    for name, tensor in merged.items():
        assert torch.equal(tensor, want[name]), f"{method}: {name}"
    record = json.loads((tmp_path / "out" / "fusion.json").read_text())
    assert record["random_seed"] == seed
    if seed is not None:
        assert f"Random seed: {seed}." in (tmp_path / "out" / "README.md").read_text()


def _cli(*argv, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fusion", *map(str, argv)], cwd=cwd, capture_output=True,
                          text=True)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dare_ties", "della_linear"])
def test_same_seed_same_bytes_across_threads_and_kernels(zoo, method, tmp_path):
    root = zoo["llama"]
    runs = [("torch", 1), ("torch", 2)] + ([("c", 1), ("c", 2)] if kernels.available() else [])
    outputs = []
    for kernel, threads in runs:
        out = tmp_path / f"out-{kernel}-{threads}"
        fusion.merge({**config(method), "random_seed": 99}, out, base_dir=root, kernel=kernel, threads=threads)
        outputs.append(_files(out))
    assert all(o == outputs[0] for o in outputs[1:]), runs
    fusion.merge({**config(method), "random_seed": 99}, tmp_path / "other", base_dir=root, random_seed=100)
    assert _files(tmp_path / "other") != outputs[0]


def test_a_drawn_seed_is_reported_and_repeats_the_merge(zoo, tmp_path):
    root = zoo["mistral"]
    (tmp_path / "merge.yaml").write_text(json.dumps({**config("dare_ties"), "base_model": str(root / "base"),
                                                     "models": [{**m, "model": str(root / m["model"])}
                                                                for m in config("dare_ties")["models"]]}))
    res = _cli("merge", "merge.yaml", "-o", "a", cwd=tmp_path)
    assert res.returncode == 0 and "random_seed was not set, so" in res.stdout + res.stderr, res.stderr
    seed = json.loads((tmp_path / "a" / "fusion.json").read_text())["random_seed"]
    assert isinstance(seed, int) and f"random_seed: {seed}" in res.stdout + res.stderr
    fusion.merge(tmp_path / "merge.yaml", tmp_path / "b", random_seed=seed)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


@pytest.mark.parametrize("parameters,first,words", [
    ({"density": 0.9}, {}, ["della: models[0] (FT1): density 0.9 with epsilon 0.15", "inside (0, 1)",
                            "(tensor model.embed_tokens.weight and", "della: models[1] ("]),
    ({}, {"density": 1.5}, ["models[0].parameters.density", "out of range"]),
    ({"epsilon": -0.1}, {}, ["parameters.epsilon", "out of range"]),
])
def test_parameter_problems_stop_the_plan(zoo, tmp_path, parameters, first, words):
    root = zoo["qwen2"]
    cfg = {"merge_method": "della", "base_model": str(root / "base"), "parameters": parameters,
           "models": [{"model": str(root / "ft1"), "parameters": first}, {"model": str(root / "ft2")}]}
    with pytest.raises(fusion.ConfigError) as raised:
        fusion.merge(cfg, tmp_path / "out")
    for w in words:
        assert w.replace("FT1", str(root / "ft1")) in str(raised.value), raised.value
    assert not (tmp_path / "out").exists()


def test_a_della_epsilon_problem_fails_fusion_plan_with_one_line(zoo, tmp_path):
    root = zoo["qwen2"]
    (tmp_path / "merge.yaml").write_text(f"merge_method: della\nbase_model: {root / 'base'}\nmodels:\n"
                                         f"  - model: {root / 'ft1'}\n    parameters: {{density: 0.1}}\n")
    res = _cli("plan", "merge.yaml", cwd=tmp_path)
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert "density 0.1 with epsilon 0.15 gives keep probabilities from -0.05 to 0.25" in res.stderr, res.stderr


@pytest.fixture(scope="module")
def nan_model(zoo, tmp_path_factory) -> Path:
    """A Llama fine-tune with one NaN in layer 0's up_proj."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("nan")
    build(root / "bad", "llama", False, 3, load_folder(zoo["llama"] / "base"))
    for shard in (root / "bad").glob("*.safetensors"):
        tensors = load_file(shard)
        if "model.layers.0.mlp.up_proj.weight" in tensors:
            tensors["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
            save_file(tensors, shard, metadata={"format": "pt"})
    return root / "bad"


@pytest.mark.parametrize("kernel", ["torch", "c"])
@pytest.mark.parametrize("method", ["ties", "dare_linear", "breadcrumbs_ties"])
def test_a_nan_in_an_input_stops_the_merge(zoo, nan_model, tmp_path, kernel, method):
    """Even where the rule drops the NaN entry (density 0.1), it is not replaced by the base."""
    if kernel == "c" and not kernels.available():
        pytest.skip("the C extension is not built here")
    root = zoo["llama"]
    cfg = {**config(method), "base_model": str(root / "base"), "random_seed": 1,
           "models": [{"model": str(nan_model), "parameters": {"density": 0.1}}, {"model": str(root / "ft2")}]}
    with pytest.raises(fusion.FusionError, match="model.layers.0.mlp.up_proj.weight has 1 non-finite"):
        fusion.merge(cfg, tmp_path / "out", kernel=kernel)
    assert not (tmp_path / "out").exists()


CHECKED = '''
import fusion

class Picky(fusion.Strategy):
    name = "picky"
    description = "The base; every tensor's parameters are refused (a test plugin)."
    parameters = ()

    def check(self, params, context):
        return f"{context.name} is not wanted"

    def merge(self, base, tensors, params, context):
        return base

@fusion.hookimpl
def register_strategies(register):
    register(Picky())
'''


def test_a_strategys_own_check_reports_a_few_problems_and_counts_the_rest(zoo, tmp_path, monkeypatch):
    from fusion import host

    (tmp_path / "picky.py").write_text(CHECKED)
    monkeypatch.setattr(host, "_local_plugins", [])
    host.add_local_plugin(str(tmp_path / "picky.py"))
    try:
        root = zoo["llama"]
        with pytest.raises(fusion.ConfigError) as raised:
            fusion.plan({"merge_method": "picky", "base_model": str(root / "base"),
                         "models": [{"model": str(root / "ft1")}]})
        lines = str(raised.value).splitlines()
        assert len(lines) == 4 and all(line.startswith("parameters: picky: ") for line in lines), lines
        for line in lines[:3]:
            name = line.removeprefix("parameters: picky: ").split(" is not wanted")[0]
            assert line.endswith(f"{name} is not wanted (tensor {name})"), line
        more = len(load_folder(root / "base")) - 3
        assert lines[3].endswith(f"picky: {more} more problems of this kind in other tensors"), lines
    finally:
        monkeypatch.setattr(host, "_local_plugins", [])
        host.reset()
