"""Property tests: generated checkpoints of every registered text architecture, merged through the
real engine, checked tensor by tensor against the formulas of docs/strategies.md."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from checkpoints import DTYPES, Shape, load_folder, random_tensors, save_checkpoint
from fusion.checkpoint import read_safetensors_header
import fusion
from fusion.api.strategy import TensorContext

OUT_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


@st.composite
def shapes(draw) -> Shape:
    heads = draw(st.integers(1, 3))
    return Shape(
        family=draw(st.sampled_from(["llama", "mistral", "qwen2", "qwen3"])),
        layers=draw(st.integers(1, 3)),
        heads=heads,
        kv_heads=draw(st.sampled_from([d for d in range(1, heads + 1) if heads % d == 0])),
        head_dim=draw(st.sampled_from([2, 4])),
        intermediate=draw(st.integers(2, 10)),
        vocab=draw(st.integers(3, 24)),
        tied=draw(st.booleans()),
    )


def merge(root: Path, yaml_text: str, shard_size: int = 10**9) -> Path:
    (root / "merge.yaml").write_text(yaml_text)
    out = root / f"out-{len(list(root.glob('out-*')))}"
    fusion.merge(root / "merge.yaml", out, shard_size=shard_size)
    return out


def models_yaml(names, weights) -> str:
    return "\n".join(f"  - model: ./{n}\n    parameters: {{weight: {w!r}}}" for n, w in zip(names, weights))


def reference(method: str, base, tensors, weights, lam: float, normalize: bool):
    """The formula in float64, element-wise, as docs/strategies.md writes it."""
    thetas = [t.double() for t in tensors]
    if method == "linear":
        total = sum(w * t for w, t in zip(weights, thetas))
        return total / sum(weights) if normalize else total
    b = base.double()
    delta = sum(w * (t - b) for w, t in zip(weights, thetas))
    if normalize and abs(sum(weights)) >= 1e-8:
        delta = delta / sum(weights)
    return b + lam * delta


def assert_within_rounding(out: torch.Tensor, ref: torch.Tensor, inputs, name: str) -> None:
    """``out`` is ``ref`` rounded to out's dtype, up to the float32 arithmetic's own error."""
    eps = torch.finfo(out.dtype).eps
    scale = max([1.0] + [float(t.double().abs().max()) for t in inputs if t.numel()])
    torch.testing.assert_close(out.double(), ref, rtol=eps, atol=scale * 1e-6 * 8 + 1e-30, msg=name)


@given(
    shape=shapes(),
    dtype=st.sampled_from(list(DTYPES)),
    shards=st.integers(1, 3),
    n_models=st.integers(1, 3),
    method=st.sampled_from(["linear", "task_arithmetic"]),
    weights=st.lists(st.floats(-1, 2, allow_nan=False).map(lambda x: round(x, 3)), min_size=3, max_size=3),
    lam=st.floats(0, 2).map(lambda x: round(x, 3)),
    normalize=st.booleans(),
    out_dtype=st.sampled_from([None, "bfloat16", "float16", "float32"]),
    out_shard=st.sampled_from([10**9, 300]),
    seed=st.integers(0, 2**16),
)
def test_merge_equals_formula(shape, dtype, shards, n_models, method, weights, lam, normalize,
                              out_dtype, out_shard, seed):
    weights = weights[:n_models]
    if method == "linear" and normalize:
        assume(abs(sum(weights)) > 0.05)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = random_tensors(shape, dtype, seed)
        save_checkpoint(root / "base", shape, dtype, base, shards)
        fts = []
        for i in range(n_models):
            fts.append(random_tensors(shape, dtype, seed + i + 1, like=base))
            save_checkpoint(root / f"ft{i}", shape, dtype, fts[-1], shards=1 + (i + shards) % 3)
        params = f"parameters: {{normalize: {str(normalize).lower()}"
        params += f", lambda: {lam!r}}}" if method == "task_arithmetic" else "}"
        text = (f"merge_method: {method}\nbase_model: ./base\nmodels:\n"
                f"{models_yaml([f'ft{i}' for i in range(n_models)], weights)}\n{params}\n")
        if out_dtype:
            text += f"out_dtype: {out_dtype}\n"
        out = merge(root, text, out_shard)

        merged = load_folder(out)
        assert list(merged) == list(base) or set(merged) == set(base)
        index_path = out / "model.safetensors.index.json"
        files = sorted(p.name for p in out.glob("*.safetensors"))
        if index_path.exists():
            index = json.loads(index_path.read_text())
            assert set(index["weight_map"]) == set(base)
            assert sorted(set(index["weight_map"].values())) == files
            assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in merged.values())
            assert all(f.startswith("model-") and f.endswith(f"-of-{len(files):05d}.safetensors") for f in files)
        else:
            assert files == ["model.safetensors"]
        for f in files:
            read_safetensors_header(out / f)  # every shard is a valid, complete safetensors file
        want = DTYPES[out_dtype or dtype]
        for name, t in merged.items():
            assert t.shape == base[name].shape and t.dtype == want, name
            ref = reference(method, base[name], [f[name] for f in fts], weights, lam, normalize)
            assert_within_rounding(t, ref, [base[name]] + [f[name] for f in fts], name)
        config = json.loads((out / "config.json").read_text())
        assert config["torch_dtype"] == (out_dtype or dtype)


@given(shape=shapes(), dtype=st.sampled_from(list(DTYPES)), seed=st.integers(0, 2**16),
       weights=st.lists(st.floats(0.1, 2).map(lambda x: round(x, 2)), min_size=2, max_size=3))
def test_identities(shape, dtype, seed, weights):
    """λ=0 gives the base; a model merged with itself gives it back; task arithmetic does not
    depend on the order of the models; the streamed result equals an in-memory merge."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = random_tensors(shape, dtype, seed)
        save_checkpoint(root / "base", shape, dtype, base, shards=2)
        names = [f"ft{i}" for i in range(len(weights))]
        fts = {n: random_tensors(shape, dtype, seed + i + 1, like=base) for i, n in enumerate(names)}
        for n, t in fts.items():
            save_checkpoint(root / n, shape, dtype, t)

        zero = load_folder(merge(root, f"merge_method: task_arithmetic\nbase_model: ./base\nmodels:\n"
                                       f"{models_yaml(names, weights)}\nparameters: {{lambda: 0.0}}\n"))
        assert all(torch.equal(zero[n], base[n]) for n in base)

        itself = load_folder(merge(root, "merge_method: linear\nmodels:\n  - model: ./ft0\n  - model: ./ft0\n"))
        assert all(torch.equal(itself[n], fts["ft0"][n]) for n in base)

        ta = "merge_method: task_arithmetic\nbase_model: ./base\nmodels:\nMODELS\nparameters: {normalize: true}\n"
        forward = load_folder(merge(root, ta.replace("MODELS", models_yaml(names, weights))))
        backward = load_folder(merge(root, ta.replace("MODELS", models_yaml(names[::-1], weights[::-1]))))
        for n in base:
            torch.testing.assert_close(forward[n], backward[n], rtol=torch.finfo(forward[n].dtype).eps, atol=1e-6)

        from fusion.plugins.task_arithmetic import TaskArithmetic

        params = {"weight": weights, "lambda": 1.0, "normalize": True}
        for n in base:  # the whole model in memory, merged by the same strategy
            in_memory = TaskArithmetic().merge(base[n].float(), [fts[m][n].float() for m in names], params,
                                               TensorContext(n))
            assert torch.equal(forward[n], in_memory.to(base[n].dtype)), n


def test_gradient_and_filter_parameters(tmp_path):
    """Per-layer gradients interpolate over layers; filters pick values by tensor name."""
    shape = Shape(family="llama", layers=3)
    base = random_tensors(shape, "float32", 1)
    ft = random_tensors(shape, "float32", 2, like=base, scale=0.1)
    save_checkpoint(tmp_path / "base", shape, "float32", base)
    save_checkpoint(tmp_path / "ft", shape, "float32", ft)
    out = load_folder(merge(tmp_path, (
        "merge_method: task_arithmetic\nbase_model: ./base\nmodels:\n  - model: ./ft\n    parameters:\n"
        "      weight:\n        - {filter: mlp, value: [0.0, 1.0]}\n        - {value: 0.25}\n")))
    expected_t = {0: 0.0, 1: 0.5, 2: 1.0}
    for name, t in out.items():
        if ".mlp." in name:
            w = expected_t[int(name.split(".")[2])]
        else:
            w = 0.25
        torch.testing.assert_close(t, base[name] + w * (ft[name] - base[name]), msg=name)


@pytest.mark.parametrize("base_tied,ft_tied", [(True, False), (False, True)])
def test_tied_and_untied_embeddings_mix(tmp_path, base_tied, ft_tied):
    """A tied model's lm_head is its embedding; the output follows the layout model's tying."""
    b_shape, f_shape = Shape(tied=base_tied), Shape(tied=ft_tied)
    base = random_tensors(b_shape, "float32", 3)
    ft = random_tensors(f_shape, "float32", 4)
    save_checkpoint(tmp_path / "base", b_shape, "float32", base)
    save_checkpoint(tmp_path / "ft", f_shape, "float32", ft)
    out = load_folder(merge(tmp_path, "merge_method: task_arithmetic\nbase_model: ./base\nmodels:\n  - model: ./ft\n"))
    assert set(out) == set(base)
    if not base_tied:
        torch.testing.assert_close(out["lm_head.weight"], ft["model.embed_tokens.weight"])


def test_vocabulary_rows_only_layout_has_are_carried(tmp_path):
    small, big = Shape(vocab=20), Shape(vocab=26)
    base = random_tensors(big, "bfloat16", 5)
    ft = random_tensors(small, "bfloat16", 6)
    save_checkpoint(tmp_path / "base", big, "bfloat16", base)
    save_checkpoint(tmp_path / "ft", small, "bfloat16", ft)
    out = load_folder(merge(tmp_path, "merge_method: task_arithmetic\nbase_model: ./base\nmodels:\n  - model: ./ft\n"
                                      "parameters: {lambda: 0.5}\n"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert out[name].shape == base[name].shape
        assert torch.equal(out[name][20:], base[name][20:])
        b = base[name][:20].float()
        torch.testing.assert_close(out[name][:20], (b + 0.5 * (ft[name].float() - b)).to(torch.bfloat16))


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_chunked_elementwise_merge_equals_whole_tensor_merge(tmp_path, monkeypatch, method):
    """Elementwise strategies run in row chunks on large tensors; the chunks must not show."""
    import fusion.stream

    shape = Shape(vocab=23, heads=3, head_dim=4)
    base = random_tensors(shape, "bfloat16", 7)
    save_checkpoint(tmp_path / "base", shape, "bfloat16", base)
    for i in range(2):
        save_checkpoint(tmp_path / f"ft{i}", shape, "bfloat16", random_tensors(shape, "bfloat16", 8 + i, like=base))
    text = (f"merge_method: {method}\nbase_model: ./base\nmodels:\n{models_yaml(['ft0', 'ft1'], [0.6, 0.9])}\n"
            "parameters: {normalize: true}\n")
    whole = load_folder(merge(tmp_path, text))
    monkeypatch.setattr(fusion.stream, "CHUNK_ELEMENTS", 25)  # several rows, not a row multiple
    chunked = load_folder(merge(tmp_path, text))
    for name in whole:
        torch.testing.assert_close(chunked[name], whole[name], rtol=2 ** -8, atol=1e-7, msg=name)


@given(method=st.sampled_from(["linear", "task_arithmetic", "ties", "sce", "varm"]),
       densities=st.lists(st.sampled_from([0.1, 0.5, 0.9, 1.0]), min_size=2, max_size=2),
       topk=st.sampled_from([0.2, 0.7, 1.0]), seed=st.integers(0, 2**16))
def test_every_builtin_strategy_end_to_end_on_sharded_bf16(method, densities, topk, seed):
    """Through the engine (sharded bf16 in and out, per-model and global parameters), each
    strategy's output equals the strategy applied to the whole model in memory."""
    from fusion.host import strategies

    strategy = strategies()[method]
    shape = Shape(family="qwen2", layers=2, vocab=17)
    per_model = {"ties": ["weight", "density"], "linear": ["weight"], "task_arithmetic": ["weight"]}.get(method, [])
    glob = {"sce": {"select_topk": topk}}.get(method, {})
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = random_tensors(shape, "bfloat16", seed)
        save_checkpoint(root / "base", shape, "bfloat16", base, shards=2)
        fts = [random_tensors(shape, "bfloat16", seed + i + 1, like=base) for i in range(2)]
        lines = []
        for i, ft in enumerate(fts):
            save_checkpoint(root / f"ft{i}", shape, "bfloat16", ft, shards=3)
            values = {"weight": [0.6, 1.3][i], "density": densities[i]}
            params = ", ".join(f"{k}: {values[k]}" for k in per_model)
            lines.append(f"  - model: ./ft{i}" + (f"\n    parameters: {{{params}}}" if params else ""))
        text = f"merge_method: {method}\nbase_model: ./base\nmodels:\n" + "\n".join(lines) + "\n"
        if glob:
            text += "parameters: {" + ", ".join(f"{k}: {v}" for k, v in glob.items()) + "}\n"
        out = load_folder(merge(root, text, shard_size=2000))
        assert set(out) == set(base)
        for name, b in base.items():
            params = {p.name: [p.default] * 2 if p.per_model else p.default for p in strategy.parameters}
            params.update(glob)
            for k in per_model:
                params[k] = [[0.6, 1.3][i] if k == "weight" else densities[i] for i in range(2)]
            use_base = b.float() if strategy.base != "unused" else None
            expected = strategy.merge(use_base, [f[name].float() for f in fts], params,
                                      TensorContext(name)).to(torch.bfloat16)
            assert torch.equal(out[name], expected), name
