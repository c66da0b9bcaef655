"""How the engine chooses kernels: C and torch merges of a whole model agree, the summary and
`fusion plugins` say which ran, and every way the C path cannot be had falls back or says why.
The kernels themselves are tested against the torch reference in test_kernels.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from checkpoints import Shape, load_folder, random_tensors, save_checkpoint
from fusion.api import kernels
from test_kernels import assert_within_one_ulp, needs_c


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
