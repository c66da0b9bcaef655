"""Hostile configs, command lines, plugins and output folders against `fusion merge` and `plan`:
YAML that expands or loops, lies about its encoding or repeats keys, numbers that overflow,
paths that cannot be expanded, plugins that fail, outputs that would eat the config. Each is one
line naming the config path (and line) or file and what to do; nothing is left behind and no
input changes (:class:`Scene`)."""

from __future__ import annotations

import fcntl
import os

import pytest

from hostile import Scene, family, one_line, scene  # noqa: F401

torch = pytest.importorskip("torch")
from safetensors.torch import load_file  # noqa: E402


def laughs(depth: int) -> str:
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, depth + 1)]
    return "\n".join(lines) + "\n"


def models_block(scene: Scene) -> str:
    return (f"merge_method: linear\nmodels:\n  - model: {scene.model('chat')}\n"
            f"  - model: {scene.model('code')}\n")


# --- YAML --------------------------------------------------------------------------------------


def test_billion_laughs_is_refused_at_once(scene):
    """Nine levels of nine-fold aliases stand for 9⁹ values; the walk stops at 20000."""
    cfg = scene.config(laughs(9) + models_block(scene).replace("merge_method", "\nmerge_method")
                       + "parameters:\n  weight: *l9\n")
    scene.refuses("plan", cfg, mentions=("merge.yaml", "more than 20000 values", "YAML alias"))


def test_recursive_alias(scene):
    cfg = scene.config(models_block(scene) + "parameters: &p\n  weight: [1, *p]\n")
    scene.refuses("plan", cfg, mentions=("parameters.weight[1]", "refers to the value it is part of"))


def test_duplicate_key_names_both_lines(scene):
    cfg = scene.config(f"""\
        merge_method: task_arithmetic
        base_model: {scene.model('base')}
        models:
          - model: {scene.model('chat')}
            parameters:
              weight: 0.7
              weight: 0.1
          - model: {scene.model('code')}
        """)
    scene.refuses("merge", cfg, "-o", scene.out,
                  mentions=("models[0].parameters.weight (line 7)", "duplicate key 'weight'", "line 6"))


def test_every_duplicate_key_is_reported(scene):
    cfg = scene.config(models_block(scene) + "merge_method: ties\nparameters: {weight: 1, weight: 2}\n")
    res = scene.run("plan", cfg)
    assert res.code == 1 and "Traceback" not in res.both
    lines = res.err.strip().splitlines()
    assert len(lines) == 2 and all(ln.startswith("error: ") and "duplicate key" in ln for ln in lines), lines
    assert "merge_method (line 5)" in lines[0] and "parameters.weight (line 6)" in lines[1]


def test_merge_keys_are_not_duplicates(scene):
    """Control: `<<: *anchor` with an override is YAML's way of sharing values, not a duplicate."""
    cfg = scene.config(f"""\
        merge_method: task_arithmetic
        base_model: {scene.model('base')}
        models:
          - model: {scene.model('chat')}
            parameters: &shared {{weight: 0.5}}
          - model: {scene.model('code')}
            parameters: {{<<: *shared, weight: 0.25}}
        """)
    res = scene.run("plan", cfg)
    assert res.code == 0, res
    assert "weight=[0.5, 0.25]" in res.out


@pytest.mark.parametrize("raw, says", [
    (b"merge_method: linear\x00\nmodels: []\n", "a NUL byte at line 1, column 21"),
    (b"merge_method: linear\nmodels: []\n\x07\n", "control character U+0007 at line 3"),
    ("merge_method: linear\nmodels: []\n".encode("utf-16"), "is UTF-16 text; save it as UTF-8"),
    ("merge_method: linear\nmodels: []\n".encode("utf-16-le"), "looks like UTF-16 or UTF-32"),
    ("merge_method: linear\nmodels: []\n".encode("utf-32"), "is UTF-32 text"),
    ("merge_method: linear\n# café\n".encode("latin-1"), "not UTF-8 text (byte 0xe9 at line 2, column 6)"),
], ids=["nul", "bell", "utf-16", "utf-16-no-bom", "utf-32", "latin-1"])
def test_config_that_is_not_utf8_text(scene, raw, says):
    cfg = scene.config_bytes(raw)
    scene.refuses("merge", cfg, "-o", scene.out, mentions=("merge.yaml", says))


def test_utf8_byte_order_mark_is_fine(scene):
    cfg = scene.config_bytes(b"\xef\xbb\xbf" + models_block(scene).encode())
    assert scene.run("plan", cfg).code == 0


def test_yaml_nested_100k_deep(scene):
    cfg = scene.config("merge_method: linear\nmodels: " + "[" * 100_000 + "]" * 100_000 + "\n")
    scene.refuses("plan", cfg, mentions=("merge.yaml", "nested too deeply"))


def test_config_that_never_ends(scene):
    """`fusion plan /dev/zero` reads 4 MB and stops, instead of reading until memory runs out."""
    scene.refuses("plan", "/dev/zero", mentions=("/dev/zero", "larger than 4 MB"))


def test_config_that_is_a_folder(scene):
    scene.refuses("plan", scene.root, mentions=(str(scene.root), "is a directory", "fusion plan --help"))


# --- numbers -------------------------------------------------------------------------------------


@pytest.mark.parametrize("value, says", [
    ("1e400", "1e400 is too large for a number"),
    ("-1.5e999", "-1.5e999 is too large for a number"),
    ("1" + "0" * 400, "too large for a number"),
], ids=["float", "negative-float", "400-digit-integer"])
def test_number_that_overflows(scene, value, says):
    cfg = scene.config(f"merge_method: linear\nmodels:\n  - model: {scene.model('chat')}\n"
                       f"    parameters: {{weight: {value}}}\n  - model: {scene.model('code')}\n")
    scene.refuses("merge", cfg, "-o", scene.out, mentions=("models[0].parameters.weight (line 4)", says))


@pytest.mark.parametrize("size", ["1e400GB", "nan", "-5MB", "1e-30B"])
def test_shard_size_that_is_not_a_size(scene, size):
    scene.refuses("merge", scene.ta(), "-o", scene.out, "--shard-size", size,
                  mentions=(f"shard size {size!r}", "5GB"))


# Two strategies of a test plugin: one with an integer parameter, one that raises on the embedding.
PLUGIN = '''\
import fusion


class EveryK(fusion.Strategy):
    name = "every_k"
    description = "Averages the models; k is an integer (a test plugin)."
    base = "unused"
    parameters = (fusion.Param("k", int, 1, minimum=1),)

    def merge(self, base, tensors, params, context):
        return sum(tensors) / len(tensors)


class Broken(EveryK):
    name = "broken"
    description = "Raises on the embedding (a test plugin)."
    parameters = ()

    def merge(self, base, tensors, params, context):
        if context.role == "embedding":
            raise ZeroDivisionError("division by zero\\nand a second line")
        return super().merge(base, tensors, params, context)


@fusion.hookimpl
def register_strategies(register):
    register(EveryK())
    register(Broken())
'''


def test_integer_parameter_given_as_a_gradient(scene):
    """A gradient of an integer would be cut to whole numbers between layers: refused instead."""
    plugin = scene.plugin("test_plugin.py", PLUGIN)
    cfg = scene.config(models_block(scene).replace("linear", "every_k") + "parameters: {k: [1, 4]}\n")
    scene.refuses("--plugin", plugin, "merge", cfg, "-o", scene.out,
                  mentions=("parameters.k (line 5)", "integer", "cannot be a gradient"))
    ok = scene.config(models_block(scene).replace("linear", "every_k") + "parameters: {k: [3]}\n", "ok.yaml")
    assert scene.run("--plugin", plugin, "plan", ok).code == 0  # one value in a list is fine


# --- paths ---------------------------------------------------------------------------------------


def test_model_path_of_an_unknown_user(scene):
    cfg = scene.ta(code="~nosuchuser/models/code")
    scene.refuses("merge", cfg, "-o", scene.out,
                  mentions=("models[1]", "'~nosuchuser/models/code'", "no such user 'nosuchuser'"))


def test_output_of_an_unknown_user(scene):
    """`-o ~nosuchuser/x` used to create a folder named `~nosuchuser` in the working folder."""
    scene.refuses("merge", scene.ta(), "-o", "~nosuchuser/merged",
                  mentions=("output folder '~nosuchuser/merged'", "no such user"))


def test_output_in_the_home_folder_is_expanded(scene, monkeypatch):
    """Control: a quoted `~/x` means the home folder, not a folder named `~`."""
    monkeypatch.setenv("HOME", str(scene.outs))
    res = scene.run("merge", scene.ta(), "-o", "~/merged", "-q")
    assert res.code == 0, res
    assert (scene.outs / "merged" / "model.safetensors").is_file()
    assert not (scene.cwd / "~").exists()


# --- the output folder ---------------------------------------------------------------------------


def test_output_that_holds_the_config_with_force(scene):
    """-o the config's own folder with --force used to delete the config with the old output."""
    folder = scene.outs / "project"
    folder.mkdir()
    cfg = folder / "merge.yaml"
    cfg.write_text(scene.ta().read_text())
    scene.inputs.append(folder)
    one_line(scene.run("merge", cfg, "-o", folder, "--force"), "holds the config file", "choose another -o")
    assert sorted(p.name for p in scene.outs.iterdir()) == ["project"]
    assert sorted(p.name for p in folder.iterdir()) == ["merge.yaml"]


def test_output_that_holds_the_config_deeper_down(scene):
    (scene.outs / "work" / "configs").mkdir(parents=True)
    cfg = scene.outs / "work" / "configs" / "merge.yaml"
    cfg.write_text(scene.ta().read_text())
    one_line(scene.run("merge", cfg, "-o", scene.outs / "work", "--force"), "holds the config file")
    assert cfg.is_file()


def test_empty_output_name_is_not_the_working_folder(scene):
    """`-o "$OUT"` with OUT unset used to replace the working folder (with --force)."""
    (scene.cwd / "notes.txt").write_text("mine\n")
    scene.inputs.append(scene.cwd / "notes.txt")
    one_line(scene.run("merge", scene.ta(), "-o", "", "--force"), "output folder is an empty name")
    assert sorted(p.name for p in scene.cwd.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("where", [".", "../cwd/sub/.."], ids=["cwd", "cwd-by-another-path"])
def test_output_that_holds_the_working_folder(scene, where):
    (scene.cwd / "sub").mkdir()
    (scene.cwd / "notes.txt").write_text("mine\n")
    one_line(scene.run("merge", scene.ta(), "-o", where, "--force"), "holds the working folder")
    assert (scene.cwd / "notes.txt").read_text() == "mine\n"


def test_failed_merge_removes_the_parent_folders_it_made(scene):
    """The merge fails midway (λ overflows float16): the output's new parents go too."""
    cfg = scene.ta(extra="parameters: {lambda: 1.0e+38}\nout_dtype: float16\n")
    scene.refuses("merge", cfg, "-o", scene.outs / "a" / "b" / "merged", "-q", mentions=("non-finite",))


def test_refused_merge_makes_no_parent_folders(scene):
    cfg = scene.ta(code="missing-model")
    scene.refuses("merge", cfg, "-o", scene.outs / "a" / "b" / "merged", mentions=("missing-model",))


def test_output_claimed_by_a_live_run_is_refused(scene):
    """Another run holds the output's claim (here: this test holds its lock)."""
    lock = scene.outs / ".merged.fusion-lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    os.write(fd, b"4242\n")
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        before = sorted(p.name for p in scene.outs.iterdir())
        one_line(scene.run("merge", scene.ta(), "-o", scene.out, "--force"),
                 "being written by another fusion run (process 4242)")
        assert sorted(p.name for p in scene.outs.iterdir()) == before  # its lock is left alone
    finally:
        os.close(fd)
        lock.unlink()


def test_leftovers_of_a_dead_run_are_removed_by_the_next(scene):
    stale = scene.outs / ".merged.fusion-tmp-0badc0de"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1000)
    (scene.outs / ".merged.fusion-lock").write_text("999999\n")  # its lock, no longer held
    other = scene.outs / ".other.fusion-tmp-12345678"  # another output's: not this run's business
    other.mkdir()
    res = scene.run("merge", scene.ta(), "-o", scene.out)
    assert res.code == 0, res
    assert f"removed {stale}" in res.out and "did not finish" in res.out
    assert sorted(p.name for p in scene.outs.iterdir()) == [".other.fusion-tmp-12345678", "merged"]


def test_a_replace_that_died_between_its_renames_is_undone(scene):
    """The old output was moved aside and the new one not yet moved in: the next run puts the
    old one back before deciding anything (so without --force it is kept)."""
    old = scene.outs / ".merged.fusion-old-0badc0de"
    old.mkdir()
    (old / "keep.txt").write_text("the previous result\n")
    res = scene.run("merge", scene.ta(), "-o", scene.out)
    assert res.code == 0, res
    one_line(scene.run("merge", scene.ta(), "-o", scene.out), "already exists")


def test_a_half_removed_old_output_is_not_taken_back(scene):
    """Killed while removing the replaced output: what is left of it is removed, never restored."""
    trash = scene.outs / ".merged.fusion-trash-0badc0de"
    trash.mkdir()
    (trash / "README.md").write_text("half of the previous result\n")
    res = scene.run("merge", scene.ta(), "-o", scene.out)
    assert res.code == 0, res
    assert sorted(p.name for p in scene.outs.iterdir()) == ["merged"]
    assert (scene.out / "model.safetensors").is_file()


def test_output_below_a_file(scene):
    (scene.outs / "notes.txt").write_text("a file, not a folder\n")
    scene.inputs.append(scene.outs / "notes.txt")
    one_line(scene.run("merge", scene.ta(), "-o", scene.outs / "notes.txt" / "merged"),
             "not a directory", "check the path")
    assert sorted(p.name for p in scene.outs.iterdir()) == ["notes.txt"]


# --- plugins -------------------------------------------------------------------------------------


def test_exception_inside_a_plugin_merge(scene):
    plugin = scene.plugin("test_plugin.py", PLUGIN)
    cfg = scene.config(models_block(scene).replace("linear", "broken"))
    scene.refuses("--plugin", plugin, "merge", cfg, "-o", scene.out, "-q",
                  mentions=("strategy 'broken' of plugin test_plugin (local)", "ZeroDivisionError (division by zero)",
                            "tensor model.embed_tokens.weight", "bug in the plugin"))


def test_plugin_whose_hook_raises_is_reported_when_used(scene):
    plugin = scene.plugin("bad_hook.py", '''\
        import fusion

        @fusion.hookimpl
        def register_strategies(register):
            raise RuntimeError("the registry is down")
        ''')
    cfg = scene.config(models_block(scene))
    scene.refuses("--plugin", plugin, "merge", cfg, "-o", scene.out,
                  mentions=("--plugin bad_hook", "register_strategies hook raised RuntimeError: the registry is down"))


def test_plugin_with_a_misspelled_hook(scene):
    plugin = scene.plugin("misspelled.py", '''\
        import fusion

        @fusion.hookimpl
        def register_strategy(register):
            pass
        ''')
    scene.refuses("--plugin", plugin, "plan", scene.config(models_block(scene)),
                  mentions=("--plugin", "misspelled.py", "register_strategy"))


@pytest.mark.parametrize("spec", ["fusion.plugins.ties", "fusion.plugins.hub"])
def test_plugin_option_naming_a_loaded_plugin(scene, spec):
    """`--plugin` of a plugin that is already loaded is a no-op, not pluggy's registry dump."""
    res = scene.run("--plugin", spec, "merge", scene.ta(), "-o", scene.out, "-q")
    assert res.code == 0, res
    listing = scene.run("--plugin", spec, "plugins")
    assert listing.code == 0 and "ERROR" not in listing.out and listing.err == ""


def test_dry_run_with_c_kernel_refuses_like_the_run(scene):
    plugin = scene.plugin("test_plugin.py", PLUGIN)
    cfg = scene.config(models_block(scene).replace("linear", "broken"))
    scene.refuses("--plugin", plugin, "merge", cfg, "-o", scene.out, "--dry-run", "--kernel", "c",
                  mentions=("--kernel c", "'broken'"))


def test_merged_output_is_complete_after_the_refusals(scene):
    """Control: the same scene's inputs still merge, into a folder that loads."""
    res = scene.run("merge", scene.ta(), "-o", scene.out, "-q")
    assert res.code == 0, res
    assert len(load_file(str(scene.out / "model.safetensors"))) == 27
