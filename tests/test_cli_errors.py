"""Bad input through the real CLI: every case exits 1 with one `error:` line that names the
offending thing, shows no traceback (unless --debug), and leaves nothing behind in the output's
parent folder (no output, no `.NAME.fusion-tmp-*`). Inputs are never modified.

Most cases call ``fusion.cli.main(argv)`` in-process (fast: torch is imported once); a few run
``python -m fusion`` in a subprocess, which is what users get, exit codes included.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import load_file, save_file  # noqa: E402

from fusion.demo import TINY_QWEN2, make_family, qwen2_tensor_shapes, write_model  # noqa: E402

# --- helpers ---------------------------------------------------------------------------------


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def both(self) -> str:
        return self.out + self.err


@pytest.fixture(autouse=True)
def _fresh_plugin_state(monkeypatch):
    """`--plugin` and the plugin cache are process globals: give every in-process run a clean slate."""
    from fusion import host as plugins

    monkeypatch.setattr(plugins, "_local_plugins", [])
    monkeypatch.delenv("FUSION_DEBUG", raising=False)
    monkeypatch.delenv("FUSION_LOAD_PLUGINS", raising=False)
    plugins.reset()
    yield
    plugins.reset()


def call_cli(capsys, *argv) -> Result:
    """Call ``fusion.cli.main(argv)`` in-process; its exit code and captured output."""
    from fusion import cli

    capsys.readouterr()
    try:
        cli.main([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return Result(code, out, err)


@pytest.fixture
def run(capsys):
    """``run(*argv)``: :func:`call_cli` with this test's captured output."""
    return lambda *argv: call_cli(capsys, *argv)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FUSION_DEBUG", "FUSION_LOAD_PLUGINS")}
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def run_subprocess(*argv, cwd: Path | None = None) -> Result:
    proc = subprocess.run([sys.executable, "-m", "fusion", *map(str, argv)], cwd=cwd, env=_env(),
                          capture_output=True, text=True, encoding="utf-8", timeout=120)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def assert_error(result: Result, *mentions: str, code: int = 1, prefix: str = "error:") -> str:
    """One line on stderr, starting with ``prefix``, naming every one of ``mentions``; no traceback."""
    assert result.code == code, result
    assert "Traceback" not in result.both, result.both
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.err}"
    line = lines[0]
    assert line.startswith(prefix), line
    for m in mentions:
        assert m in line, f"{m!r} not in {line!r}"
    return line


def assert_nothing_left(parent: Path) -> None:
    """The output's parent holds nothing new: no output folder, no temporary or old folder."""
    left = sorted(p.name for p in parent.iterdir())
    assert left == [], f"left behind in {parent}: {left}"


def tree_digest(*folders: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file under the folders (and the file list itself)."""
    out = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                out[str(p)] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """base/, chat/, code/: a tiny bf16 Qwen2 and two fine-tunes (shared; never modified)."""
    root = tmp_path_factory.mktemp("family")
    tensors = make_family(root)
    return root, tensors


@pytest.fixture
def outs(tmp_path) -> Path:
    """An empty parent folder for the output, so that leftovers are easy to see."""
    p = tmp_path / "outs"
    p.mkdir()
    return p


def write_config(folder: Path, text: str, name: str = "merge.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def ta_config(folder: Path, base: Path, chat: Path, code: Path, extra: str = "") -> Path:
    """task_arithmetic of chat and code over base (absolute paths)."""
    text = textwrap.dedent(f"""\
        merge_method: task_arithmetic
        base_model: {base}
        models:
          - model: {chat}
            parameters: {{weight: 0.7}}
          - model: {code}
            parameters: {{weight: 0.3}}
        """)
    return write_config(folder, text + textwrap.dedent(extra))


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


RANGED_PLUGIN = '''\
import fusion


class Ranged(fusion.Strategy):
    name = "ranged_average"
    description = "Average with a per-model density in (0, 1] (a test plugin)."
    base = "unused"
    parameters = (
        fusion.Param("density", float, 1.0, per_model=True, minimum=0, maximum=1, exclusive_minimum=True),
        fusion.Param("gain", float, 1.0, minimum=0, maximum=4),
    )

    def merge(self, base, tensors, params, context):
        return sum(tensors) / len(tensors)


@fusion.hookimpl
def register_strategies(register):
    register(Ranged())
'''

# A strategy that fails on its 5th tensor, in one of three ways (chosen by the module name).
FAILING_PLUGIN = '''\
import fusion

KIND = {kind!r}
calls = 0


class FailsLate(fusion.Strategy):
    name = "fails_late"
    description = "Averages four tensors, then fails (a test plugin)."
    base = "unused"
    parameters = ()

    def merge(self, base, tensors, params, context):
        global calls
        calls += 1
        if calls == 5:
            if KIND == "keyboard":
                raise KeyboardInterrupt
            if KIND == "fusion_error":
                raise fusion.FusionError("the fifth tensor is not welcome")
            raise RuntimeError("boom on the fifth tensor")
        return sum(tensors) / len(tensors)


@fusion.hookimpl
def register_strategies(register):
    register(FailsLate())
'''


# --- models that cannot be read --------------------------------------------------------------


def test_missing_model_path(family, tmp_path, outs):
    root, _ = family
    cfg = ta_config(tmp_path, root / "base", root / "chat", tmp_path / "no-such-model")
    res = run_subprocess("merge", cfg, "-o", outs / "merged")  # the real CLI, exit code included
    assert_error(res, "models[1]", "no-such-model", "does not exist")
    assert_nothing_left(outs)


def test_missing_model_path_relative_to_config(family, tmp_path, outs, run):
    root, _ = family
    cfg = write_config(tmp_path, f"""\
        merge_method: linear
        models:
          - model: {root / 'chat'}
          - model: ./missing-finetune
        """)
    res = run("merge", cfg, "-o", outs / "merged")
    assert_error(res, "models[1]", str(tmp_path / "missing-finetune"))
    assert_nothing_left(outs)


def test_folder_that_is_not_a_model(family, tmp_path, outs, run):
    root, _ = family
    notamodel = tmp_path / "notamodel"
    notamodel.mkdir()
    (notamodel / "README.md").write_text("just a folder\n")
    cfg = ta_config(tmp_path, root / "base", notamodel, root / "code")
    res = run("merge", cfg, "-o", outs / "merged")
    assert_error(res, "models[0]", str(notamodel), "config.json")
    assert_nothing_left(outs)


def test_model_with_config_but_no_weights(family, tmp_path, outs, run):
    root, _ = family
    empty = tmp_path / "noweights"
    empty.mkdir()
    shutil.copy(root / "chat" / "config.json", empty / "config.json")
    cfg = ta_config(tmp_path, root / "base", root / "chat", empty)
    res = run("merge", cfg, "-o", outs / "merged")
    assert_error(res, "models[1]", str(empty), "no weights")
    assert_nothing_left(outs)


def test_model_reference_that_is_a_file(family, tmp_path, outs, run):
    root, _ = family
    weights = root / "code" / "model.safetensors"
    cfg = ta_config(tmp_path, root / "base", root / "chat", weights)
    res = run("merge", cfg, "-o", outs / "merged")
    assert_error(res, "models[1]", str(weights), "not a model folder")
    assert_nothing_left(outs)


def test_model_with_invalid_config_json(family, tmp_path, outs, run):
    root, _ = family
    bad = copy_model(root / "chat", tmp_path / "chat")
    (bad / "config.json").write_text('{"architectures": ["Qwen2ForCausalLM"],')
    cfg = ta_config(tmp_path, root / "base", bad, root / "code")
    res = run("merge", cfg, "-o", outs / "merged")
    assert_error(res, "models[0]", str(bad / "config.json"), "not valid JSON")
    assert_nothing_left(outs)


def _garbage(data: bytes) -> bytes:
    return b"this is not a safetensors file, just some text " * 20


def _truncated(data: bytes) -> bytes:
    return data[: len(data) * 2 // 3]


def _huge_header(data: bytes) -> bytes:
    return (2**40).to_bytes(8, "little") + data[8:]


def _header_not_json(data: bytes) -> bytes:
    return (16).to_bytes(8, "little") + b"{not json at all" + data[24:]


@pytest.mark.parametrize("damage", [_garbage, _truncated, _huge_header, _header_not_json],
                         ids=["garbage", "truncated", "header-too-long", "header-not-json"])
def test_corrupt_safetensors(family, tmp_path, outs, run, damage):
    root, _ = family
    bad = copy_model(root / "code", tmp_path / "code")
    weights = bad / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    cfg = ta_config(tmp_path, root / "base", root / "chat", bad)
    res = run("merge", cfg, "-o", outs / "merged")
    assert_error(res, str(weights), "not a valid safetensors file")
    assert_nothing_left(outs)


def test_header_length_too_big_is_reported_as_such(family, tmp_path, outs, run):
    root, _ = family
    bad = copy_model(root / "code", tmp_path / "code")
    weights = bad / "model.safetensors"
    weights.write_bytes(_huge_header(weights.read_bytes()))
    cfg = ta_config(tmp_path, root / "base", root / "chat", bad)
    assert_error(run("merge", cfg, "-o", outs / "merged"), f"header length {2**40}")


def _write_sharded(folder: Path, tensors: dict, config: dict) -> list[str]:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    names = sorted(tensors)
    half = len(names) // 2
    files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weight_map = {}
    for shard, part in zip(files, (names[:half], names[half:])):
        save_file({n: tensors[n].contiguous() for n in part}, str(folder / shard), metadata={"format": "pt"})
        weight_map.update({n: shard for n in part})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return files


def test_sharded_checkpoint_with_missing_shard(family, tmp_path, outs, run):
    root, tensors = family
    sharded = tmp_path / "chat-sharded"
    files = _write_sharded(sharded, tensors["chat"], TINY_QWEN2)
    # complete, it merges
    cfg = ta_config(tmp_path, root / "base", sharded, root / "code")
    assert run("merge", cfg, "-o", tmp_path / "ok", "-q").code == 0
    (sharded / files[1]).unlink()
    res = run("merge", cfg, "-o", outs / "merged", "-q")
    assert_error(res, "models[0]", files[1], "missing")
    assert_nothing_left(outs)


# --- models that do not fit together ---------------------------------------------------------


def test_shape_mismatch_between_models(family, tmp_path, outs, run):
    root, _ = family
    narrow_cfg = dict(TINY_QWEN2, hidden_size=32, intermediate_size=64)
    narrow = write_model(tmp_path / "narrow", narrow_cfg, {
        n: torch.zeros(s, dtype=torch.bfloat16) for n, s in qwen2_tensor_shapes(narrow_cfg).items()})
    cfg = ta_config(tmp_path, root / "base", root / "chat", narrow)
    res = run("merge", cfg, "-o", outs / "merged")
    line = assert_error(res, "shape mismatch", "models[1]")
    assert re.search(r"tensor (model\.|lm_head)\S+", line), line
    assert_nothing_left(outs)


def test_tensor_missing_in_one_model(family, tmp_path, outs, run):
    root, tensors = family
    missing = "model.layers.1.mlp.up_proj.weight"
    chat = {n: t for n, t in tensors["chat"].items() if n != missing}
    write_model(tmp_path / "chat", TINY_QWEN2, chat)
    cfg = ta_config(tmp_path, root / "base", tmp_path / "chat", root / "code")
    res = run("merge", cfg, "-o", outs / "merged")
    assert_error(res, missing, "models[0]", "missing")
    assert_nothing_left(outs)


# --- config errors ---------------------------------------------------------------------------


def test_missing_config_file(tmp_path, outs, run):
    res = run("merge", tmp_path / "nope.yaml", "-o", outs / "merged")
    assert_error(res, "nope.yaml", "does not exist")
    assert_nothing_left(outs)


def test_unknown_merge_method_lists_known_methods(family, tmp_path, outs):
    root, _ = family
    cfg = write_config(tmp_path, f"""\
        merge_method: tiez
        base_model: {root / 'base'}
        models: [{root / 'chat'}, {root / 'code'}]
        """)
    res = run_subprocess("merge", cfg, "-o", outs / "merged")
    line = assert_error(res, "merge_method", "'tiez'", "linear", "task_arithmetic")
    assert "(line 1)" in line
    assert_nothing_left(outs)


CONFIG_CASES = {
    # name: (extra config text, things the one-line error must name)
    "unknown-parameter-per-model": (
        "models:\n  - model: {chat}\n    parameters: {{densty: 0.5}}\n  - model: {code}\n",
        ["models[0].parameters.densty", "unknown parameter", "weight"]),
    "unknown-parameter-global": (
        "models: [{chat}, {code}]\nparameters: {{lamda: 0.5}}\n",
        ["parameters.lamda", "unknown parameter", "lambda"]),
    "global-parameter-set-per-model": (
        "models:\n  - model: {chat}\n  - model: {code}\n    parameters: {{lambda: 0.5}}\n",
        ["models[1].parameters.lambda", "global"]),
    "not-a-number": (
        "models:\n  - model: {chat}\n    parameters: {{weight: heavy}}\n  - model: {code}\n",
        ["models[0].parameters.weight", "number", "heavy"]),
    "not-a-bool": (
        "models: [{chat}, {code}]\nparameters: {{normalize: 3}}\n",
        ["parameters.normalize", "true or false"]),
    "non-finite-value": (
        "models: [{chat}, {code}]\nparameters: {{lambda: .inf}}\n",
        ["parameters.lambda", "finite"]),
    "unknown-top-level-key": (
        "models: [{chat}, {code}]\nmerge_options: {{fast: true}}\n",
        ["merge_options (line 4)", "unknown key"]),
    "misplaced-parameter": (
        "models: [{chat}, {code}]\nlambda: 0.5\n",
        ["lambda (line 4)", "unknown key", "parameter of task_arithmetic", "under `parameters:`"]),
    "typo-of-a-key": (
        "models: [{chat}, {code}]\ndype: float16\n",
        ["dype (line 4)", "did you mean `dtype`?"]),
    "unknown-key-in-model-entry": (
        "models:\n  - model: {chat}\n    weight: 0.5\n  - model: {code}\n",
        ["models[0].weight", "unknown key"]),
    "bad-dtype": (
        "models: [{chat}, {code}]\nout_dtype: float8\n",
        ["out_dtype", "float8"]),
    "empty-models": ("models: []\n", ["models"]),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_config_errors_name_the_config_path(family, tmp_path, outs, run, case):
    root, _ = family
    body, mentions = CONFIG_CASES[case]
    text = (f"merge_method: task_arithmetic\nbase_model: {root / 'base'}\n"
            + body.format(chat=root / "chat", code=root / "code"))
    (tmp_path / "merge.yaml").write_text(text)
    res = run("merge", tmp_path / "merge.yaml", "-o", outs / "merged")
    assert_error(res, *mentions)
    assert_nothing_left(outs)


def test_plan_reports_config_errors_the_same_way(family, tmp_path, run):
    root, _ = family
    cfg = ta_config(tmp_path, root / "base", root / "chat", root / "code", "parameters: {lamda: 2}\n")
    assert_error(run("plan", cfg), "parameters.lamda", "unknown parameter")


def test_bad_shard_size(family, tmp_path, outs, run):
    root, _ = family
    cfg = ta_config(tmp_path, root / "base", root / "chat", root / "code")
    assert_error(run("merge", cfg, "-o", outs / "merged", "--shard-size", "banana"), "banana", "size")
    assert_nothing_left(outs)


def test_missing_plugin_file_is_named(family, tmp_path, outs, run):
    root, _ = family
    cfg = write_config(tmp_path, f"""\
        merge_method: ranged_average
        models: [{root / 'chat'}, {root / 'code'}]
        """)
    res = run("--plugin", tmp_path / "no_such_plugin.py", "merge", cfg, "-o", outs / "merged")
    assert_error(res, "no_such_plugin.py")
    assert_nothing_left(outs)


def test_yaml_syntax_error_gives_the_line(family, tmp_path, outs, run):
    root, _ = family
    cfg = write_config(tmp_path, f"""\
        merge_method: linear
        models:
          - model: {root / 'chat'}
            parameters: {{weight: 1
          - model: {root / 'code'}
        """)
    res = run("merge", cfg, "-o", outs / "merged")
    assert_error(res, "merge.yaml", "YAML", "line 5")
    assert_nothing_left(outs)


@pytest.fixture
def ranged_plugin(tmp_path) -> Path:
    path = tmp_path / "ranged_plugin.py"
    path.write_text(RANGED_PLUGIN)
    return path


@pytest.mark.parametrize("value, where", [
    ("0", "models[1].parameters.density"),        # exclusive minimum
    ("-0.5", "models[1].parameters.density"),
    ("1.5", "models[1].parameters.density"),
    ("[0.5, 1.2]", "models[1].parameters.density[1]"),  # a gradient
    ("[{filter: mlp, value: 2}, {value: 0.5}]", "models[1].parameters.density[0].value"),  # a filter list
], ids=["zero", "negative", "above-max", "gradient", "filter-list"])
def test_out_of_range_parameter(family, tmp_path, outs, run, ranged_plugin, value, where):
    root, _ = family
    cfg = write_config(tmp_path, f"""\
        merge_method: ranged_average
        models:
          - model: {root / 'chat'}
            parameters: {{density: 0.5}}
          - model: {root / 'code'}
            parameters: {{density: {value}}}
        """)
    res = run("--plugin", ranged_plugin, "merge", cfg, "-o", outs / "merged")
    line = assert_error(res, where, "out of range", "(0, 1]")
    assert "(line 6)" in line or "(line 7)" in line, line
    assert_nothing_left(outs)


def test_out_of_range_global_parameter(family, tmp_path, outs, ranged_plugin):
    root, _ = family
    cfg = write_config(tmp_path, f"""\
        merge_method: ranged_average
        models: [{root / 'chat'}, {root / 'code'}]
        parameters: {{gain: 5}}
        """)
    res = run_subprocess("--plugin", ranged_plugin, "merge", cfg, "-o", outs / "merged")
    assert_error(res, "parameters.gain (line 3)", "out of range", "[0, 4]")
    assert_nothing_left(outs)


def test_in_range_parameters_merge(family, tmp_path, outs, run, ranged_plugin):
    """The control for the cases above: the same plugin and config with valid values merge."""
    root, _ = family
    cfg = write_config(tmp_path, f"""\
        merge_method: ranged_average
        models:
          - model: {root / 'chat'}
            parameters: {{density: 1}}
          - model: {root / 'code'}
            parameters: {{density: [0.1, 1.0]}}
        parameters: {{gain: 4}}
        """)
    res = run("--plugin", ranged_plugin, "merge", cfg, "-o", outs / "merged", "-q")
    assert res.code == 0, res
    assert (outs / "merged" / "model.safetensors").is_file()


def test_scientific_notation_without_dot_is_a_number(family, tmp_path, outs, run):
    root, _ = family
    cfg = ta_config(tmp_path, root / "base", root / "chat", root / "code", "parameters: {lambda: 5e-1}\n")
    res = run("merge", cfg, "-o", outs / "merged", "-q")
    assert res.code == 0, res


# --- merges that go wrong --------------------------------------------------------------------


def test_non_finite_merged_tensor_from_an_inf_input(family, tmp_path, outs, run):
    root, tensors = family
    name = "model.layers.0.mlp.up_proj.weight"
    chat = dict(tensors["chat"])
    chat[name] = chat[name].clone()
    chat[name][3, 5] = float("inf")
    write_model(tmp_path / "chat", TINY_QWEN2, chat)
    cfg = ta_config(tmp_path, root / "base", tmp_path / "chat", root / "code")
    res = run("merge", cfg, "-o", outs / "merged", "-q")
    assert_error(res, name, "non-finite")
    assert_nothing_left(outs)


def test_non_finite_merged_tensor_from_overflow(family, tmp_path, outs, run):
    """λ = 1e38 is a valid float32 but the result overflows float16."""
    root, _ = family
    cfg = ta_config(tmp_path, root / "base", root / "chat", root / "code",
                    "parameters: {lambda: 1.0e+38}\nout_dtype: float16\n")
    res = run("merge", cfg, "-o", outs / "merged", "-q")
    line = assert_error(res, "non-finite", "F16")
    assert re.search(r"tensor (model\.|lm_head)\S+", line), line
    assert_nothing_left(outs)


def test_error_after_progress_bar_is_the_last_line(family, tmp_path, outs, run):
    """Without --quiet a progress bar may precede the error; the error is still one clean line."""
    root, _ = family
    cfg = ta_config(tmp_path, root / "base", root / "chat", root / "code",
                    "parameters: {lambda: 1.0e+38}\nout_dtype: float16\n")
    res = run("merge", cfg, "-o", outs / "merged")
    assert res.code == 1
    assert "Traceback" not in res.both
    last = res.err.strip().splitlines()[-1]
    assert last.startswith("error: merged tensor ") and "non-finite" in last
    assert_nothing_left(outs)


@pytest.mark.parametrize("kind, code, message", [
    ("keyboard", 130, "interrupted"),
    ("exception", 1, "error: strategy 'fails_late' of plugin fails_exception (local) raised RuntimeError "
                     "(boom on the fifth tensor) on tensor model."),
    ("fusion_error", 1, "error: tensor "),
])
def test_interrupted_run_leaves_nothing(family, tmp_path, outs, run, kind, code, message):
    root, _ = family
    plugin = tmp_path / f"fails_{kind}.py"
    plugin.write_text(FAILING_PLUGIN.format(kind=kind))
    cfg = write_config(tmp_path, f"""\
        merge_method: fails_late
        models: [{root / 'chat'}, {root / 'code'}]
        """)
    argv = ("--plugin", plugin, "merge", cfg, "-o", outs / "merged", "-q")
    # a KeyboardInterrupt must not escape into pytest: run that one in a subprocess
    res = run_subprocess(*argv) if kind == "keyboard" else run(*argv)
    if kind == "keyboard":  # the exit code and message are checked by test_ctrl_c_exits_130_with_a_clear_message
        assert res.code != 0 and "Traceback" not in res.both, res
    else:
        assert_error(res, code=code, prefix=message)
    if kind == "fusion_error":
        assert "the fifth tensor is not welcome" in res.err
    assert_nothing_left(outs)


def test_ctrl_c_exits_130_with_a_clear_message(family, tmp_path, outs):
    root, _ = family
    plugin = tmp_path / "fails_keyboard.py"
    plugin.write_text(FAILING_PLUGIN.format(kind="keyboard"))
    cfg = write_config(tmp_path, f"""\
        merge_method: fails_late
        models: [{root / 'chat'}, {root / 'code'}]
        """)
    res = run_subprocess("--plugin", plugin, "merge", cfg, "-o", outs / "merged", "-q")
    assert_error(res, "no output was written", code=130, prefix="interrupted")
    assert_nothing_left(outs)


def test_failed_run_with_force_keeps_the_old_output(family, tmp_path, run):
    root, _ = family
    outs = tmp_path / "outs"
    out = outs / "merged"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("previous result\n")
    cfg = ta_config(tmp_path, root / "base", root / "chat", root / "code",
                    "parameters: {lambda: 1.0e+38}\nout_dtype: float16\n")
    res = run("merge", cfg, "-o", out, "--force", "-q")
    assert_error(res, "non-finite")
    assert sorted(p.name for p in outs.iterdir()) == ["merged"]
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "previous result\n"


# --- the output folder -----------------------------------------------------------------------


def test_output_exists_and_is_not_empty(family, tmp_path, run):
    root, _ = family
    outs = tmp_path / "outs"
    out = outs / "merged"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("mine\n")
    cfg = ta_config(tmp_path, root / "base", root / "chat", root / "code")
    res = run("merge", cfg, "-o", out, "-q")
    assert_error(res, str(out), "not empty", "--force")
    assert sorted(p.name for p in outs.iterdir()) == ["merged"]
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]

    res = run("merge", cfg, "-o", out, "-q", "--force")
    assert res.code == 0, res
    assert res.err == ""
    assert sorted(p.name for p in outs.iterdir()) == ["merged"]  # no temporary or old folder left
    names = {p.name for p in out.iterdir()}
    assert "keep.txt" not in names and {"model.safetensors", "config.json"} <= names


def test_empty_output_folder_is_used(family, tmp_path, run):
    root, _ = family
    out = tmp_path / "outs" / "merged"
    out.mkdir(parents=True)
    cfg = ta_config(tmp_path, root / "base", root / "chat", root / "code")
    assert run("merge", cfg, "-o", out, "-q").code == 0
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["merged"]


@pytest.mark.parametrize("target", ["base", "code", "parent"])
def test_output_over_an_input_is_refused_even_with_force(family, tmp_path, run, target):
    root, _ = family
    models = tmp_path / "models"
    for tag in ("base", "chat", "code"):
        copy_model(root / tag, models / tag)
    cfg = ta_config(tmp_path, models / "base", models / "chat", models / "code")
    before = tree_digest(models)
    out = models if target == "parent" else models / target
    res = run("merge", cfg, "-o", out, "--force", "-q")
    assert_error(res, "input model", "choose another -o")
    assert tree_digest(models) == before
    assert sorted(p.name for p in models.iterdir()) == ["base", "chat", "code"]


def test_inputs_are_never_modified(family, tmp_path, run):
    root, _ = family
    before = tree_digest(root)
    cfg = ta_config(tmp_path, root / "base", root / "chat", root / "code")
    res = run("merge", cfg, "-o", tmp_path / "merged", "-q", "--shard-size", "50KB")
    assert res.code == 0, res
    assert res.err == ""
    assert tree_digest(root) == before
    merged = tmp_path / "merged"
    assert (merged / "model.safetensors.index.json").is_file()
    assert len(load_file(str(next(merged.glob("model-00001-of-*.safetensors"))))) > 0


def test_dry_run_writes_nothing(family, tmp_path, outs, run):
    root, _ = family
    cfg = ta_config(tmp_path, root / "base", root / "chat", root / "code")
    res = run("merge", cfg, "-o", outs / "merged", "--dry-run")
    assert res.code == 0, res
    assert "task_arithmetic" in res.out
    assert_nothing_left(outs)


# --- --debug ---------------------------------------------------------------------------------


def test_debug_shows_the_traceback(family, tmp_path, outs):
    root, _ = family
    cfg = ta_config(tmp_path, root / "base", root / "chat", tmp_path / "no-such-model")
    plain = run_subprocess("merge", cfg, "-o", outs / "merged")
    assert_error(plain, "no-such-model")
    debug = run_subprocess("--debug", "merge", cfg, "-o", outs / "merged")
    assert debug.code != 0
    assert "Traceback (most recent call last)" in debug.err
    assert "no-such-model" in debug.err
    assert_nothing_left(outs)
