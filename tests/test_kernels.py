"""The C kernels against the torch reference: same selection masks, results within one unit in
the last place of the output dtype, exact conversions; and how the engine chooses kernels.

The C tests are skipped only where the extension is genuinely not built, and never when
FUSION_REQUIRE_C=1 (set by CI), where a missing extension fails the run.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from checkpoints import Shape, load_folder, random_tensors, save_checkpoint
from fusion.api import kernels
from fusion.checkpoint import Checkpoint, open_checkpoint
from fusion.plugins.linear import Linear
from fusion.plugins.sce import Sce, _population_variance
from fusion.plugins.task_arithmetic import TaskArithmetic
from fusion.plugins.ties import Ties
from fusion.api.selection import topk_count, topk_mask
from fusion.api.strategy import TensorContext

CTX = TensorContext("tensor")

REQUIRED = os.environ.get("FUSION_REQUIRE_C") == "1"
needs_c = pytest.mark.skipif(not kernels.available() and not REQUIRED,
                             reason="the C extension is not built here")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def test_c_kernels_are_built_where_required():
    assert kernels.available() or not REQUIRED, kernels.status()


# ---------------------------------------------------------------------------------------------
# Helpers


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in units in the last place of a's dtype (as int64); NaN vs NaN is 0."""
    assert a.dtype == b.dtype and a.shape == b.shape
    bits = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[a.dtype]

    def ordered(x):
        i = x.reshape(-1).view(bits).to(torch.int64)
        top = 1 << (torch.iinfo(bits).bits - 1)
        return torch.where(i < 0, -(i + top), i)  # sign-magnitude → a monotone integer line

    d = (ordered(a) - ordered(b)).abs()
    na, nb = torch.isnan(a.reshape(-1)), torch.isnan(b.reshape(-1))
    d = torch.where(na & nb, 0, d)
    return torch.where(na ^ nb, torch.iinfo(torch.int64).max, d)


def assert_within_one_ulp(actual: torch.Tensor, expected: torch.Tensor) -> None:
    d = ulps(actual, expected)
    worst = int(d.max()) if d.numel() else 0
    assert worst <= 1, (f"{int((d > 1).sum())} values differ by more than 1 ulp; first at "
                        f"{int((d > 1).nonzero()[0])}: {actual.reshape(-1)[(d > 1)][:4]} vs "
                        f"{expected.reshape(-1)[(d > 1)][:4]}")


SPECIAL = [0.0, -0.0, 1e-40, -1e-40, 6e-8, -6e-8, 1e-3, -1e-3, 0.1, -0.1, 0.5, 1.0, -1.0, 2.5, 7.0,
           65504.0, 70000.0, float("inf"), float("-inf"), float("nan")]
# exactly representable in every dtype: many equal deltas, so ties at the k-th key abound
TIE_VALUES = [0.0, -0.0, 0.125, -0.125, 0.25, -0.25, 0.5, -0.5, 1.0, -1.0, 1.5, 2.0, -2.0]

fractions = st.one_of(st.sampled_from([1.0, 0.5, 0.1, 0.29, 0.7, 1e-9, 0.999999]),
                      st.floats(0.0, 1.0, exclude_min=True))
weights_st = st.one_of(st.sampled_from([1.0, -1.0, 0.5, 2.0, 0.0, 0.3, 1e-9]), st.floats(-3.0, 3.0, width=32))
lambdas = st.one_of(st.sampled_from([1.0, 0.0, -1.0, 0.5]), st.floats(-2.0, 2.0, width=32))


@st.composite
def inputs(draw, min_models: int = 1, max_models: int = 4):
    """(base, models, out_dtype): flat tensors of assorted dtypes over mostly tied values, some
    drawn from specials (signed zeros, subnormals, inf, NaN, fp16 overflow)."""
    n = draw(st.one_of(st.integers(0, 3), st.integers(0, 70), st.sampled_from([257, 1031])))
    kind = draw(st.sampled_from(["ties", "ties", "wide", "special"]))
    if kind == "ties":
        element = st.sampled_from(TIE_VALUES)
    elif kind == "wide":
        element = st.floats(-8.0, 8.0, width=32)
    else:
        element = st.one_of(st.sampled_from(SPECIAL), st.floats(-4.0, 4.0, width=32))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    pool = torch.tensor(draw(st.lists(element, min_size=1, max_size=12)), dtype=torch.float32)

    def one():
        values = pool[torch.randint(len(pool), (n,), generator=gen)]
        return values.to(draw(st.sampled_from(DTYPES)))

    base = one()
    models = []
    for _ in range(draw(st.integers(min_models, max_models))):
        choice = draw(st.sampled_from(["fresh", "fresh", "base", "copy"]))
        if choice == "base":
            models.append(base.clone())
        elif choice == "copy" and models:
            models.append(models[-1].clone())  # equal deltas: zero variance
        else:
            models.append(one())
    return base, models, draw(st.sampled_from(DTYPES))


def reference(strategy, base, models, params, out_dtype) -> torch.Tensor:
    b = base.float() if base is not None else None
    return strategy.merge(b, [m.float() for m in models], params, CTX).to(out_dtype)


# ---------------------------------------------------------------------------------------------
# Conversions


def _bit_equal_or_both_nan(a: torch.Tensor, b: torch.Tensor) -> None:
    bits = torch.int32 if a.dtype == torch.float32 else torch.int16
    same = (a.view(bits) == b.view(bits)) | (torch.isnan(a) & torch.isnan(b))
    assert bool(same.all()), f"{int((~same).sum())} conversions differ, e.g. at {int((~same).nonzero()[0])}"


@needs_c
@pytest.mark.parametrize("src", [torch.bfloat16, torch.float16])
def test_every_16_bit_pattern_converts_like_torch(src):
    patterns = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(src)
    for dst in DTYPES:
        _bit_equal_or_both_nan(kernels.convert(patterns, dst), patterns.to(dst))


@needs_c
def test_float32_rounds_to_nearest_even_like_torch():
    gen = torch.Generator().manual_seed(1)
    random_bits = torch.randint(-(1 << 31), 1 << 31, (1 << 20,), generator=gen, dtype=torch.int64)
    # halfway and near-halfway cases for both 16-bit formats, over every 16-bit prefix
    prefixes = torch.arange(0, 1 << 16, dtype=torch.int64) << 16
    tails = torch.tensor([0x8000, 0x7FFF, 0x8001, 0x1000, 0x0FFF, 0x1001, 0x3000, 0xFFFF, 0x0001])
    near = (prefixes[:, None] | tails[None, :]).reshape(-1)
    values = torch.cat([random_bits, near]).to(torch.int64)
    values = torch.where(values >= 1 << 31, values - (1 << 32), values).to(torch.int32).view(torch.float32)
    for dst in (torch.bfloat16, torch.float16):
        _bit_equal_or_both_nan(kernels.convert(values, dst), values.to(dst))


# ---------------------------------------------------------------------------------------------
# Selection


@needs_c
@given(st.data())
def test_topk_mask_equals_reference(data):
    n = data.draw(st.one_of(st.integers(0, 80), st.sampled_from([1, 2, 513])))
    dtype = data.draw(st.sampled_from(DTYPES))
    element = st.one_of(st.sampled_from(SPECIAL + TIE_VALUES), st.floats(-4.0, 4.0, width=32))
    keys = torch.tensor(data.draw(st.lists(element, min_size=n, max_size=n)), dtype=torch.float32).to(dtype)
    k = data.draw(st.one_of(st.integers(0, n), st.sampled_from([0, n])))
    assert torch.equal(kernels.topk_mask(keys, k), topk_mask(keys.float(), k))


@needs_c
@pytest.mark.parametrize("threads", [1, 3, 4])
def test_topk_mask_ties_across_threads(threads):
    # large enough for several threads; few distinct keys, so the k-th key is tied many times
    gen = torch.Generator().manual_seed(threads)
    keys = torch.randint(0, 5, (400_003,), generator=gen).float() * 0.25
    for k in (0, 1, 77_777, 200_001, 399_999, 400_003):
        assert torch.equal(kernels.topk_mask(keys, k, threads=threads), topk_mask(keys, k))


# ---------------------------------------------------------------------------------------------
# Strategies


@needs_c
@given(inputs(), st.data())
def test_linear_and_task_arithmetic_equal_reference(case, data):
    base, models, out_dtype = case
    weights = data.draw(st.lists(weights_st, min_size=len(models), max_size=len(models)))
    lam, normalize = data.draw(lambdas), data.draw(st.booleans())
    out = torch.empty(base.numel(), dtype=out_dtype)
    params = {"weight": weights, "lambda": lam, "normalize": normalize}
    TaskArithmetic().merge_compiled(out, base, models, params, CTX, threads=2, release=False)
    assert_within_one_ulp(out, reference(TaskArithmetic(), base, models, params, out_dtype))
    params = {"weight": weights, "normalize": normalize and abs(sum(weights)) >= 1e-8}
    Linear().merge_compiled(out, None, models, params, CTX, threads=2, release=False)
    assert_within_one_ulp(out, reference(Linear(), None, models, params, out_dtype))


@needs_c
@given(inputs(), st.data())
def test_ties_equals_reference(case, data):
    base, models, out_dtype = case
    n = base.numel()
    weights = data.draw(st.lists(weights_st, min_size=len(models), max_size=len(models)))
    densities = data.draw(st.lists(fractions, min_size=len(models), max_size=len(models)))
    lam, normalize = data.draw(lambdas), data.draw(st.booleans())
    ks = [topk_count(d, n) for d in densities]
    out = torch.empty(n, dtype=out_dtype)
    masks = [torch.empty(n, dtype=torch.bool) for _ in models]
    kernels.trimmed_sign_merge(out, base, models, weights, ks, scale=lam, normalize=normalize, threads=2,
                               masks=masks)
    for mask, model, k in zip(masks, models, ks):
        assert torch.equal(mask, topk_mask((model.float() - base.float()).abs(), k))
    params = {"weight": weights, "density": densities, "lambda": lam, "normalize": normalize}
    assert_within_one_ulp(out, reference(Ties(), base, models, params, out_dtype))


@needs_c
@given(inputs(), fractions, st.sampled_from(["all", "weights"]), lambdas)
def test_sce_equals_reference(case, tau, scope, lam):
    base, models, out_dtype = case
    n = base.numel()
    out = torch.empty(n, dtype=out_dtype)
    mask = torch.empty(n, dtype=torch.bool)
    kernels.variance_selected_merge(out, base, models, fraction=tau, mask_deltas=scope == "all", scale=lam,
                                    threads=2, mask=mask)
    if tau < 1:
        variance = _population_variance([m.float() - base.float() for m in models])
        expected = topk_mask(variance, topk_count(tau, int(torch.count_nonzero(variance))))
    else:
        expected = torch.ones(n, dtype=torch.bool)
    assert torch.equal(mask, expected)
    params = {"select_topk": tau, "select_scope": scope, "lambda": lam}
    assert_within_one_ulp(out, reference(Sce(), base, models, params, out_dtype))


# ---------------------------------------------------------------------------------------------
# Building blocks beyond what the built-in strategies use


def sign_merge_reference(base, models, weights, ks, scale, normalize, elect):
    """trimmed_sign_merge's formula in torch, with or without the sign election."""
    b = base.float()
    deltas = [m.float() - b for m in models]
    weighted = [w * torch.where(topk_mask(d.abs(), min(k, d.numel())), d, 0.0)
                for w, d, k in zip(weights, deltas, ks)]
    if elect:
        elected = torch.where(sum(weighted) >= 0, 1.0, -1.0)
        agrees = [torch.sign(x) == elected for x in weighted]
    else:
        agrees = [torch.ones_like(b, dtype=torch.bool) for _ in weighted]
    total = sum(torch.where(m, x, 0.0) for m, x in zip(agrees, weighted))
    if normalize:
        divisor = sum(torch.where(m, w, 0.0) for m, w in zip(agrees, weights))
        total = total / torch.where(divisor == 0, 1.0, divisor)
    return b + scale * total


@needs_c
@given(inputs(), st.data())
def test_trimmed_sign_merge_with_and_without_the_election(case, data):
    base, models, out_dtype = case
    n = base.numel()
    weights = data.draw(st.lists(weights_st, min_size=len(models), max_size=len(models)))
    ks = data.draw(st.lists(st.integers(0, n + 2), min_size=len(models), max_size=len(models)))
    scale, normalize, elect = data.draw(lambdas), data.draw(st.booleans()), data.draw(st.booleans())
    out = torch.empty(n, dtype=out_dtype)
    masks = [torch.empty(n, dtype=torch.bool) for _ in models]
    kernels.trimmed_sign_merge(out, base, models, weights, ks, scale=scale, normalize=normalize,
                               elect_signs=elect, threads=2, masks=masks)
    for mask, model, k in zip(masks, models, ks):
        assert torch.equal(mask, topk_mask((model.float() - base.float()).abs(), min(k, n)))
    expected = sign_merge_reference(base, models, weights, ks, scale, normalize, elect)
    assert_within_one_ulp(out, expected.to(out_dtype))


@needs_c
@given(inputs(), st.data())
def test_weighted_sum_without_a_base_scales_the_sum(case, data):
    _, models, out_dtype = case
    weights = data.draw(st.lists(weights_st, min_size=len(models), max_size=len(models)))
    scale = data.draw(lambdas)
    params = {"weight": weights, "normalize": data.draw(st.booleans()) and abs(sum(weights)) >= 1e-8}
    out = torch.empty(models[0].numel(), dtype=out_dtype)
    kernels.weighted_sum(out, models, weights, scale=scale, normalize=params["normalize"], threads=2)
    expected = Linear().merge(None, [m.float() for m in models], params, CTX)
    assert_within_one_ulp(out, (expected if scale == 1.0 else expected * scale).to(out_dtype))


@needs_c
def test_building_blocks_reject_mismatched_arguments():
    base, models = torch.zeros(8), [torch.ones(8), torch.ones(8)]
    out = torch.empty(8)
    with pytest.raises(ValueError, match="weights"):
        kernels.trimmed_sign_merge(out, base, models, [1.0], [4, 4])
    with pytest.raises(ValueError, match="2 models"):
        kernels.trimmed_sign_merge(out, base, models, [1.0, 1.0], [4])
    with pytest.raises(ValueError, match="expected 8 elements"):
        kernels.weighted_sum(out, [torch.ones(9)], [1.0])
    with pytest.raises(ValueError, match="inputs"):
        kernels.variance_selected_merge(out, base, [], fraction=0.5)
    with pytest.raises(TypeError, match="not supported"):
        kernels.weighted_sum(out, [torch.ones(8, dtype=torch.float64)], [1.0])


def test_the_building_blocks_are_documented_and_name_no_strategy():
    from fusion.host import strategies

    doc = (Path(__file__).resolve().parent.parent / "docs" / "plugins.md").read_text()
    for name in kernels.__all__:
        assert f"`{name}" in doc, f"fusion.api.kernels.{name} is not in docs/plugins.md"
        assert name not in strategies(), f"fusion.api.kernels.{name} is named after a strategy"


def _big_family(n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, generator=gen) * 0.05).bfloat16()
    # bf16 deltas on a coarse grid: the k-th magnitude is tied thousands of times
    models = [(base.float() + torch.randint(-3, 4, (n,), generator=gen) * 2.0**-9).bfloat16()
              for _ in range(3)]
    return base, models


@needs_c
@pytest.mark.parametrize("threads", [1, 4])
def test_many_threads_and_ties_on_a_larger_tensor(threads):
    n = 200_003  # four threads' worth (kernels give each thread at least 65536 elements)
    base, models = _big_family(n, threads)
    out = torch.empty(n, dtype=torch.bfloat16)
    masks = [torch.empty(n, dtype=torch.bool) for _ in models]
    params = {"weight": [1.0, 0.5, 0.7], "density": [0.5, 0.3, 0.77], "lambda": 0.9, "normalize": True}
    ks = [topk_count(d, n) for d in params["density"]]
    kernels.trimmed_sign_merge(out, base, models, params["weight"], ks, scale=0.9, normalize=True,
                               threads=threads, masks=masks)
    for mask, model, k in zip(masks, models, ks):
        assert torch.equal(mask, topk_mask((model.float() - base.float()).abs(), k))
    assert_within_one_ulp(out, reference(Ties(), base, models, params, torch.bfloat16))
    deltas = [m.float() - base.float() for m in models]
    variance = _population_variance(deltas)
    for tau in (0.1, 0.7):
        mask = torch.empty(n, dtype=torch.bool)
        _, energies = kernels.variance_selected_merge(out, base, models, fraction=tau, mask_deltas=True,
                                                      scale=1.0, threads=threads, mask=mask)
        params = {"select_topk": tau, "select_scope": "all", "lambda": 1.0}
        assert_within_one_ulp(out, reference(Sce(), base, models, params, torch.bfloat16))
        selected = topk_mask(variance, topk_count(tau, int(torch.count_nonzero(variance))))
        assert torch.equal(mask, selected)
        # the energies of the selection, however the kernel splits its sums (ties at the k-th
        # variance straddle the threads' ranges here)
        expected = [float((d.double() * selected).square().sum()) for d in deltas]
        assert energies == pytest.approx(expected, rel=1e-12)


@needs_c
def test_released_file_maps_still_read_correctly(tmp_path):
    """release=True drops pages of read-only maps as the kernels go: the results and the files
    stay intact (the pages come back from the page cache)."""
    from safetensors.torch import save_file

    n = 3 << 20
    base, models = _big_family(n, 7)
    for i, t in enumerate([base, *models]):
        (tmp_path / f"m{i}").mkdir()
        (tmp_path / f"m{i}" / "config.json").write_text("{}")
        save_file({"w": t}, str(tmp_path / f"m{i}" / "model.safetensors"))
    before = [(tmp_path / f"m{i}" / "model.safetensors").read_bytes() for i in range(4)]
    ckpts: list[Checkpoint] = [open_checkpoint(tmp_path / f"m{i}", f"m{i}") for i in range(4)]
    views = [c.read("w") for c in ckpts]
    out = torch.empty(n, dtype=torch.bfloat16)
    params = {"weight": [1.0, 1.0, 1.0], "density": [0.5] * 3, "lambda": 1.0, "normalize": True}
    Ties().merge_compiled(out, views[0], views[1:], params, CTX, threads=2, release=True)
    assert_within_one_ulp(out, reference(Ties(), base, models, params, torch.bfloat16))
    assert all(torch.equal(v, t) for v, t in zip(views, [base, *models]))
    for c in ckpts:
        c.close()
    assert before == [(tmp_path / f"m{i}" / "model.safetensors").read_bytes() for i in range(4)]


# ---------------------------------------------------------------------------------------------
# The engine's choice of kernels


@pytest.fixture
def family(tmp_path):
    """A Qwen2 base (vocab 26) and two fine-tunes (vocab 20 and 26): mixed vocabulary rows."""
    big, small = Shape(vocab=26, intermediate=40, heads=4, head_dim=8), Shape(vocab=20, intermediate=40,
                                                                             heads=4, head_dim=8)
    base = random_tensors(big, "bfloat16", 1)
    save_checkpoint(tmp_path / "base", big, "bfloat16", base)
    save_checkpoint(tmp_path / "a", small, "bfloat16", random_tensors(small, "bfloat16", 2,
                    like={k: v[:20] if k.endswith("embed_tokens.weight") or k.startswith("lm_head")
                          else v for k, v in base.items()}))
    save_checkpoint(tmp_path / "b", big, "float32", random_tensors(big, "float32", 3, like=base))
    return tmp_path


CONFIGS = {
    "ties": "parameters: {density: 0.4, weight: 0.7}",
    "sce": "parameters: {select_topk: 0.3}",
    "task_arithmetic": "parameters: {weight: 0.5, lambda: 0.8}",
    "linear": "parameters: {weight: 0.5}",
}


def _config(root: Path, method: str) -> Path:
    base = "" if method == "linear" else "base_model: ./base\n"
    models = "  - model: ./base\n" if method == "linear" else ""
    path = root / f"{method}.yaml"
    path.write_text(f"merge_method: {method}\n{base}models:\n{models}  - model: ./a\n  - model: ./b\n"
                    f"{CONFIGS.get(method, '')}\n")
    return path


def _cli(*argv) -> tuple[int, str]:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "fusion", *map(str, argv)], capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


@needs_c
@pytest.mark.parametrize("method", ["ties", "sce", "task_arithmetic", "linear"])
def test_c_and_torch_merges_agree(family, method):
    from fusion.cli import main

    cfg = _config(family, method)
    main(["merge", str(cfg), "-o", str(family / f"{method}-c"), "--kernel", "c", "--threads", "3", "-q"])
    main(["merge", str(cfg), "-o", str(family / f"{method}-torch"), "--kernel", "torch", "-q"])
    c, t = load_folder(family / f"{method}-c"), load_folder(family / f"{method}-torch")
    assert c.keys() == t.keys()
    for name in c:
        assert c[name].dtype == t[name].dtype and c[name].shape == t[name].shape, name
        assert_within_one_ulp(c[name], t[name])
    if method != "linear":  # rows only the base has are carried from it unchanged
        base = load_folder(family / "base")
        assert torch.equal(c["model.embed_tokens.weight"][20:], base["model.embed_tokens.weight"][20:])


@needs_c
def test_summary_names_the_kernel(family):
    code, out = _cli("merge", _config(family, "ties"), "-o", family / "out", "--threads", "2")
    assert code == 0 and "c kernel, 2 threads" in out, out
    code, out = _cli("merge", _config(family, "ties"), "-o", family / "out2", "--kernel", "torch")
    assert code == 0 and "torch kernel" in out, out
    code, out = _cli("plugins")
    assert "merge kernels: C (built" in out


NEGATE = '''
import fusion

class Negate(fusion.Strategy):
    name = "negate"
    description = "Subtract the task vectors."
    parameters = ()

    def merge(self, base, tensors, params, context):
        return base - sum(t - base for t in tensors)

@fusion.hookimpl
def register_strategies(register):
    register(Negate())
'''


def test_strategy_without_c_path(family):
    """auto falls back to the torch reference; --kernel c says why it cannot be had."""
    (family / "negate.py").write_text(NEGATE)
    cfg = family / "negate.yaml"
    cfg.write_text("merge_method: negate\nbase_model: ./base\nmodels:\n  - model: ./a\n")
    code, out = _cli("--plugin", family / "negate.py", "merge", cfg, "-o", family / "auto")
    assert code == 0 and "torch kernel" in out, out
    code, out = _cli("--plugin", family / "negate.py", "merge", cfg, "-o", family / "c", "--kernel", "c")
    assert code == 1 and "strategy 'negate' has no C kernel" in out and "--kernel auto" in out, out
    assert not (family / "c").exists()


def test_without_the_extension_everything_runs_on_torch(family, monkeypatch, capsys):
    from fusion.cli import main

    monkeypatch.setattr(kernels, "_c", None)
    main(["merge", str(_config(family, "ties")), "-o", str(family / "out")])
    assert "torch kernel" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["merge", str(_config(family, "ties")), "-o", str(family / "out-c"), "--kernel", "c"])
    assert exc.value.code == 1
    assert "C kernels are not built" in capsys.readouterr().err
    main(["plugins"])
    assert "torch reference only" in capsys.readouterr().out


@needs_c
def test_sce_kernel_energies_are_sums_of_squares():
    base = torch.zeros(5, dtype=torch.float32)
    models = [torch.tensor([1.0, -2.0, 0.0, 0.5, 3.0]), torch.tensor([0.25, 0.0, 0.0, 0.0, -1.0])]
    out = torch.empty(5)
    _, energies = kernels.variance_selected_merge(out, base, models, fraction=1.0, mask_deltas=True,
                                                  scale=1.0)
    assert energies == [sum(x * x for x in m.tolist()) for m in models]
    assert math.isclose(sum(energies), 15.3125)


@needs_c
def test_inputs_the_kernels_cannot_read_fall_back_to_torch(family, capsys):
    """A float64 fine-tune: its tensors are merged by the torch reference, with a notice."""
    from fusion.cli import main

    shape = Shape(vocab=26, intermediate=40, heads=4, head_dim=8)
    base = load_folder(family / "base")
    save_checkpoint(family / "f64", shape, "float32",
                    {k: v.double() + 0.01 for k, v in base.items()})
    cfg = family / "f64.yaml"
    cfg.write_text("merge_method: ties\nbase_model: ./base\nmodels:\n  - model: ./f64\n  - model: ./b\n"
                   "parameters: {density: 0.5}\n")
    main(["merge", str(cfg), "-o", str(family / "c"), "--kernel", "c"])
    out = capsys.readouterr().out
    assert "c kernel" in out and "merged by the torch reference" in out, out
    main(["merge", str(cfg), "-o", str(family / "torch"), "--kernel", "torch", "-q"])
    c, t = load_folder(family / "c"), load_folder(family / "torch")
    assert all(torch.equal(c[name], t[name]) for name in t)


@needs_c
def test_the_c_path_never_imports_torch(family):
    """Start-up and memory: a C merge reads and writes bytes, so torch is never loaded."""
    import subprocess
    import sys

    code = ("import sys\nfrom fusion.cli import main\n"
            f"main(['merge', {str(_config(family, 'sce'))!r}, '-o', {str(family / 'out')!r}, '-q'])\n"
            "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, 'torch or numpy imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (family / "out" / "model.safetensors").exists()
